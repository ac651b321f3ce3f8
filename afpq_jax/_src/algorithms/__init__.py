"""The built-in methods (each module: its math and a `Method` adapter registered on import)."""

from afpq_jax._src.algorithms.awq import AWQ
from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.algorithms.gptq import GPTQ
from afpq_jax._src.algorithms.rtn import RTN

__all__ = ["AWQ", "GPTQ", "RTN", "ClipSearch"]

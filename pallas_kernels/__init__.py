"""Pallas kernels for afpq-jax (TPU: Mosaic; GPU: Triton and Mosaic GPU), under their historical name.

The op lives in `afpq_jax.kernels` (``afpq_jax/_src/kernels/quantized_matmul/``: API, registry, XLA reference, one
file per backend); this package re-exports its public API so ``pallas_kernels.quantized_matmul(x, qt)`` keeps
working. It imports nothing but afpq_jax's public API.
"""

from afpq_jax.kernels import (DISPATCH_ORDER, IMPLEMENTATIONS, BlockConfig, Implementation, Problem, current_backend,
                              default_config, quantized_matmul, register_implementation, roofline,
                              select_implementation, why_not)
from afpq_jax.kernels import resolve as resolve_config  # the historical name

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "BlockConfig", "Implementation", "Problem", "current_backend",
           "default_config", "quantized_matmul", "register_implementation", "resolve_config", "roofline",
           "select_implementation", "why_not"]

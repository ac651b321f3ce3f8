"""W·A8 integer matmul: int8 activations times integer weight levels, int32 sums, float epilogue.

One op, one folder: `api` (the op and its implementation registry), `xla` (the reference integer path).
"""

from afpq_jax._src.kernels.quantized_matmul_a8.api import IMPLEMENTATIONS, quantized_matmul_a8
from afpq_jax._src.kernels.quantized_matmul_a8.xla import (activation_scale, integer_weight,
                                                           quantize_activations)

__all__ = ["IMPLEMENTATIONS", "activation_scale", "integer_weight", "quantize_activations", "quantized_matmul_a8"]

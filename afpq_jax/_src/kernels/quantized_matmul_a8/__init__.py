"""W·A8 integer matmul: int8 activations times integer weight levels, int32 sums, float epilogue.

One op, one folder: `api` (the op, its implementations and dispatch), `xla` (the reference integer path),
`mosaic_tpu` (TPU), `triton` (GPU). Shares the problem description, tilings and in-kernel decoding of `quantized_matmul`.
"""

from afpq_jax._src.kernels.quantized_matmul_a8.api import DISPATCH_ORDER, IMPLEMENTATIONS, quantized_matmul_a8, why_not
from afpq_jax._src.kernels.quantized_matmul_a8.xla import (activation_scale, integer_weight,
                                                           quantize_activations)

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "activation_scale", "integer_weight", "quantize_activations", "quantized_matmul_a8",
           "why_not"]

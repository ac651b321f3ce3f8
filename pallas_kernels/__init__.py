"""Pallas kernels for afpq-jax (TPU: Mosaic; GPU: Triton and Mosaic GPU).

`quantized_matmul(x, qt)` computes ``x @ dequantize(qt)`` straight from the packed weight.
"""

from pallas_kernels.quantized_matmul import (DISPATCH_ORDER, IMPLEMENTATIONS, BlockConfig, quantized_matmul,
                                             register_implementation, select_implementation, why_not)

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "BlockConfig", "quantized_matmul", "register_implementation",
           "select_implementation", "why_not"]

"""Fused dequantize-matmul for packed `QuantizedTensor` weights: ``x @ dequantize(qt)``."""

from pallas_kernels.quantized_matmul.api import (DISPATCH_ORDER, IMPLEMENTATIONS, Implementation, quantized_matmul,
                                                 register_implementation, select_implementation, why_not)
from pallas_kernels.quantized_matmul.base import BlockConfig, Problem, default_config

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "BlockConfig", "Implementation", "Problem", "default_config",
           "quantized_matmul", "register_implementation", "select_implementation", "why_not"]

"""Fused dequantize-matmul for packed `QuantizedTensor` weights: ``x @ dequantize(qt)``.

One op, one folder: `api` (the op, its implementations in the shared `kernels.registry`, dispatch, tiling
resolution), `base` (problem description, shared helpers), `xla` (the reference), one file per backend with its
own tiling rules (`mosaic_tpu`, `triton`, `mosaic_gpu`, `xla_scan`, `cpu`), `decode` (in-kernel code -> value
shared by the kernels), `roofline` (byte and op counts for benchmarks) and `tuning` (measured tilings per device
and shape).
"""

from afpq_jax._src.kernels.quantized_matmul.api import (DISPATCH_ORDER, IMPLEMENTATIONS, Implementation,
                                                        current_backend, default_config, quantized_matmul,
                                                        register_implementation, resolve, select_implementation,
                                                        why_not)
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "BlockConfig", "Implementation", "Problem", "current_backend",
           "default_config", "quantized_matmul", "register_implementation", "resolve", "select_implementation",
           "why_not"]

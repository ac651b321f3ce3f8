"""Public view of the kernels: `quantized_matmul(x, qt)` = ``x @ dequantize(qt)`` straight from packed codes.

Dispatch picks the fused Pallas kernel for the default backend (Mosaic TPU; Triton, then Mosaic GPU) and falls
back to the XLA reference (dequantize, then one dot); `IMPLEMENTATIONS` is the registry, `why_not` says why a
kernel declines a call, `roofline` holds the byte and op counts the benchmarks compare against, `tuning` the
measured tilings (`benchmarks/autotune.py` records them).
`quantized_matmul_a8(x, qt, input_scale)`: the W·A8 integer path (int8 activations, int32 sums).
`cpu_kernel_isa()`: the vector ISA of the C++ CPU kernel this process runs ("avx512", "avx2", "neon",
"portable"; None where it cannot be built).
"""

from afpq_jax._src.kernels.quantized_matmul import (DISPATCH_ORDER, IMPLEMENTATIONS, BlockConfig, Implementation,
                                                    Problem, current_backend, default_config, quantized_matmul,
                                                    register_implementation, resolve, select_implementation,
                                                    why_not)
from afpq_jax._src.kernels.quantized_matmul import roofline, tuning
from afpq_jax._src.kernels.quantized_matmul.cpu import isa as cpu_kernel_isa
from afpq_jax._src.kernels.quantized_matmul_a8 import (activation_scale, integer_weight, quantize_activations,
                                                       quantized_matmul_a8)

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "BlockConfig", "Implementation", "Problem", "activation_scale",
           "cpu_kernel_isa", "current_backend", "default_config", "integer_weight", "quantize_activations",
           "quantized_matmul", "quantized_matmul_a8", "register_implementation", "resolve", "roofline",
           "select_implementation", "tuning", "why_not"]

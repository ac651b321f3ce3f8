"""The reference implementation (and the CPU path): dequantize with the project's own semantics, then one dot.

Dequantization is *not* re-implemented here: `afpq_jax._src.quantizer.dequantize` is the one definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afpq_jax._src import quantizer
from afpq_jax._src.qtensor import QuantizedTensor


def dot_precision(dtype) -> jax.lax.Precision:
    # float32 activations get a true float32 matmul on every backend (TPU/GPU would otherwise use bf16/TF32
    # passes); 16-bit activations use the native MXU / tensor-core path.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def quantized_matmul_xla(x: jax.Array, qt: QuantizedTensor, **_unused) -> jax.Array:
    """``x @ dequantize(qt, x.dtype)`` with float32 accumulation, result in ``x.dtype``.

    ``x``: (..., K); ``qt``: (K, N) or with leading (batch) axes matching x's leading axes after broadcasting
    the usual `jnp.matmul` way.
    """
    w = quantizer.dequantize(qt, x.dtype)
    if w.ndim == 2:
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=dot_precision(x.dtype),
                                preferred_element_type=jnp.float32)
    else:  # stacked weights: batched matmul semantics of jnp.matmul
        y = jnp.matmul(x, w, precision=dot_precision(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)

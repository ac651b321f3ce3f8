"""afpq-jax: asymmetric floating-point (AFPQ) low-bit quantization of LLMs for JAX.

Public API (everything else lives in `afpq_jax._src` and may change):
  quantize, dequantize, fake_quant, QuantizedTensor — pure-functional quantizers and the packed tensor.
  formats — the code books (int2/3/4/8, fp4_e2m1, fp3_e2m0, nf4, nf3) and the ExMy builder.
"""

from afpq_jax import formats
from afpq_jax._src.formats import Format, available_formats, get_format
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import dequantize, fake_quant, quantize

__version__ = "0.1.0"

__all__ = ["Format", "QuantizedTensor", "available_formats", "dequantize", "fake_quant", "formats", "get_format",
           "quantize"]

from afpq_jax._src.layers import QuantDense, QuantScheme  # noqa: E402
from afpq_jax._src.pipeline import load, load_tokenizer  # noqa: E402

__all__ += ["QuantDense", "QuantScheme", "load", "load_tokenizer"]

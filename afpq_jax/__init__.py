"""afpq-jax: asymmetric floating-point (AFPQ) low-bit quantization of LLMs for JAX.

Public API (everything else lives in `afpq_jax._src` and may change):
  quantize, dequantize, fake_quant, QuantizedTensor — pure-functional quantizers and the packed tensor.
  QuantScheme, QuantRule, load_rules, default_rules — what to quantize, and how, by layer path.
  load, quantize_pretrained, save, Calibration — load a model, quantize it in memory, write the checkpoint.
  Method, register_method, get_method, available_methods, RTN, GPTQ, AWQ, ClipSearch — the method registry.
  ActivationQuant — int8 activations (W4A8: FPTQ's layer-wise rule, static, dynamic, SmoothQuant).
  QuantDense — the Flax NNX layer (float or packed weight).
  generate — batched greedy / sampled (temperature, top-k, top-p) decoding with a KV cache.
  train_qat, QATConfig, SelfGeneratedData, QATResult — quantization-aware training by self-distillation
    (BitDistiller: CAKLD, clipping init, self-generated data) exported to the packed checkpoint.
  formats, kernels, assets (imported on demand) — code books, the fused matmul op, the built-in model and texts.
  qwix (imported on demand, needs the qwix extra) — AFPQ for any Flax model through qwix providers.
  AfpqError, InputError, CheckpointError, OutputError, QuantizationError — the errors raised on purpose.
"""

from afpq_jax import formats
from afpq_jax._src.errors import AfpqError, CheckpointError, InputError, OutputError, QuantizationError
from afpq_jax._src.formats import Format, available_formats, get_format
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import dequantize, fake_quant, quantize
from afpq_jax._src.scheme import QuantRule, QuantScheme, default_rules, load_rules, resolve_rules, rules_from_json
from afpq_jax._src.layers import QuantDense
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.method import BlockContext, Method, available_methods, get_method, register_method
from afpq_jax._src.calibration.taps import ABS_MAX, ABS_SUM, XTX, Statistic
from afpq_jax._src.algorithms import AWQ, GPTQ, RTN, ClipSearch
from afpq_jax._src.algorithms.activations import ActivationQuant
from afpq_jax._src.models import CausalLM
from afpq_jax._src.checkpoint import load, save
from afpq_jax._src.conversion import quantize_pretrained
from afpq_jax._src.io.tokenizers import load_tokenizer, tokenize
from afpq_jax._src.training.qat import QATResult, train_qat
from afpq_jax._src.training.data import SelfGeneratedData
from afpq_jax._src.training.trainer import QATConfig
from afpq_jax._src.generation import generate

__version__ = "0.1.0"

__all__ = ["ABS_MAX", "ABS_SUM", "AWQ", "ActivationQuant", "AfpqError", "BlockContext", "Calibration", "CausalLM",
           "CheckpointError", "ClipSearch", "Format", "GPTQ", "InputError", "Method", "OutputError", "QATConfig", "QATResult", "QuantDense", "QuantRule",
           "QuantScheme", "QuantizationError", "QuantizedTensor", "RTN", "Statistic", "XTX", "available_formats",
           "available_methods", "default_rules", "dequantize", "fake_quant", "formats", "generate", "get_format", "get_method",
           "load", "load_rules", "load_tokenizer", "quantize", "quantize_pretrained", "register_method",
           "resolve_rules", "rules_from_json", "save", "SelfGeneratedData", "tokenize", "train_qat"]

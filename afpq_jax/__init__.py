"""afpq-jax: asymmetric floating-point (AFPQ) low-bit quantization of LLMs for JAX.

The root holds the nouns and verbs of the main job; every other public name has one home in a submodule.
  load, save, load_tokenizer, tokenize, CausalLM — models in and out (HF, GGUF, converted checkpoints; GPTQ,
    AWQ and compressed-tensors checkpoints load packed as they are).
  export — a quantized model as a Hugging Face directory serving stacks read (compressed-tensors, GPTQ, afpq).
  quantize, dequantize, fake_quant, QuantizedTensor — pure-functional quantizers and the packed tensor.
  QuantScheme, QuantRule, default_rules, load_rules, resolve_rules, rules_from_json — what to quantize, how,
    by layer path.
  quantize_pretrained, Calibration, RTN, GPTQ, AWQ, ClipSearch, ActivationQuant — post-training quantization
    (W4A8 included).
  train_qat, QATConfig, SelfGeneratedData, QATResult — quantization-aware training by self-distillation
    (BitDistiller: CAKLD, clipping init, self-generated data) exported to the packed checkpoint.
  QuantDense — the Flax NNX layer (float or packed weight).
  generate — batched greedy / sampled (temperature, top-k, top-p) decoding with a KV cache.
  evaluate — lm-evaluation-harness tasks on a model (`afpq_jax.lm_eval`; loaded on first use, needs the eval
    extra).
  AfpqError, InputError, CheckpointError, OutputError, QuantizationError — the errors raised on purpose.
Submodules: `formats` (code books), `calibration` (the method protocol and registry, taps), `algorithms` (the
methods' pure math), `training` (QAT building blocks), `kernels` (the fused matmul ops), `eval` (perplexity),
`assets` (the built-in model and texts) and `qwix` (AFPQ for any Flax model; needs the qwix extra) — the last
four imported on demand. Everything in `afpq_jax._src` is private and may change.
"""

import warnings as _warnings

from afpq_jax import formats
from afpq_jax._src.errors import AfpqError, CheckpointError, InputError, OutputError, QuantizationError
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import dequantize, fake_quant, quantize
from afpq_jax._src.scheme import QuantRule, QuantScheme, default_rules, load_rules, resolve_rules, rules_from_json
from afpq_jax._src.layers import QuantDense
from afpq_jax._src.calibration.data import Calibration
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
from afpq_jax import calibration
from afpq_jax import export  # the module is callable: afpq_jax.export(model, out, format=...)

__version__ = "0.1.0"

__all__ = ["AWQ", "ActivationQuant", "AfpqError", "CausalLM", "Calibration", "CheckpointError", "ClipSearch", "GPTQ",
           "InputError", "OutputError", "QATConfig", "QATResult", "QuantDense", "QuantRule", "QuantScheme",
           "QuantizationError", "QuantizedTensor", "RTN", "SelfGeneratedData", "calibration", "default_rules",
           "dequantize", "export", "fake_quant", "formats", "generate", "load", "load_rules", "load_tokenizer", "quantize",
           "quantize_pretrained", "resolve_rules", "rules_from_json", "save", "tokenize", "train_qat"]

# Names the root exported before each got one home (still reachable, with a warning saying where they live).
_MOVED = {name: "formats" for name in ("Format", "available_formats", "get_format")} | {
    name: "calibration" for name in ("ABS_MAX", "ABS_SUM", "XTX", "BlockContext", "Method", "Statistic",
                                     "available_methods", "get_method", "register_method")}


def __getattr__(name: str):
    if name == "evaluate":  # lm-eval is an optional extra: imported when first asked for
        from afpq_jax.lm_eval import evaluate
        return evaluate
    if name in _MOVED:
        home = _MOVED[name]
        _warnings.warn(f"afpq_jax.{name} moved to afpq_jax.{home}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(globals()[home], name)
    raise AttributeError(f"module 'afpq_jax' has no attribute {name!r}")

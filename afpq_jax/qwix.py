"""Quantize any Flax model (NNX or Linen) with afpq-jax's formats through google's qwix.

Install with ``pip install 'afpq-jax[qwix]'`` (qwix versions in `TESTED_QWIX_VERSIONS`). Rules are qwix
rules carrying an afpq-jax `QuantScheme`::

    import qwix, afpq_jax as aq
    from afpq_jax.qwix import AfpqRule, PtqProvider
    rules = [AfpqRule(module_path=r".*(q|k|v|o|gate|up|down)_proj", scheme=aq.QuantScheme.create("nf3"))]
    qmodel = qwix.quantize_model(model, PtqProvider(rules), tokens)   # NNX: weights packed on this call

  AfpqRule — a qwix rule with ``scheme`` (None: the layer stays float).
  PtqProvider — packed weights (`PackedWeight`), matmuls on the fused kernels.
  QatProvider — forward through fake_quant with a straight-through gradient, for your own training loop.
  GptqCalibration — one-pass Hessians per weight for GPTQ with AFPQ scales.
  quantize_params — float params tree -> packed params for an (abstract) PTQ model, one weight at a time.
  save_state, restore_state — the packed model state with orbax; packed_weights lists a model's packed weights.
  WeightLayout — how an einsum / dot_general weight maps to the (K, N) kernel the quantizer groups.
"""

try:
    import qwix as _qwix  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("afpq_jax.qwix needs qwix: pip install 'afpq-jax[qwix]'") from e

from afpq_jax._src.interop.layout import WeightLayout
from afpq_jax._src.interop.qwix_compat import TESTED_QWIX_VERSIONS, check_qwix_version
from afpq_jax._src.interop.qwix_providers import (AfpqRule, GptqCalibration, PackedWeight, PtqProvider, QatProvider,
                                                  packed_weights, quantize_params)
from afpq_jax._src.interop.qwix_state import restore_state, save_state

check_qwix_version()

__all__ = ["TESTED_QWIX_VERSIONS", "AfpqRule", "GptqCalibration", "PackedWeight", "PtqProvider", "QatProvider",
           "WeightLayout", "packed_weights", "quantize_params", "restore_state", "save_state"]

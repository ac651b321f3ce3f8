"""The QAT student: a float model whose quantized layers run through ``fake_quant`` (`QuantDense.enable_fake_quant`),
initialised with BitDistiller's asymmetric clipping, and exported to the packed checkpoint.

Clipping init (BitDistiller, from AWQ's auto_clip): block by block on calibration inputs that went through the
blocks before it (float, already clipped), the two-sided clip search (`algorithms.clip`, q/k skipped) picks
per-group shrink ratios, and the latent float kernel is *clamped* to them once. It runs in the calibration
driver like every calibrated method (`ClipInit`, a method that packs nothing), so it gets the driver's memory
budget and progress bar. Fake quantization then takes the
min/max of the clamped kernel, so before training the student's weights equal the clipped RTN weights exactly,
and afterwards the clip range moves with the trained latent weights (as in BitDistiller).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.calibration import driver
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.method import BlockContext, Method
from afpq_jax._src.errors import InputError
from afpq_jax._src.loading import ModelWeights
from afpq_jax._src.models import CausalLM
from afpq_jax._src.quantizer import to_groups, from_groups
from afpq_jax._src.scheme import QuantScheme

FROZEN = ("embed", "lm_head")  # BitDistiller: embeddings and the LM head stay float and are not trained


def clamp_to_ratios(kernel: jax.Array, group_size: int | None, ratios: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``kernel`` (K, N) with each group's values clamped to ``[min · r_neg, max · r_pos]`` (ratios (G, 1, N)):
    its min/max then *are* the clipped range, so RTN of the result equals RTN of ``kernel`` with these ratios."""
    k = kernel.shape[0]
    g = k if group_size is None else min(group_size, k)
    wg = to_groups(kernel.astype(jnp.float32), g)
    lo = jnp.min(wg, axis=-2, keepdims=True) * ratios[0]
    hi = jnp.max(wg, axis=-2, keepdims=True) * ratios[1]
    return from_groups(jnp.clip(wg, lo, hi), k).astype(kernel.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipInit(Method):
    """BitDistiller's clipping init as a driver method: per block, the two-sided search's ratios clamp each
    layer's latent float kernel (`clamp_to_ratios`); nothing is packed."""

    name: ClassVar[str] = "clip-init"
    packs: ClassVar[bool] = False
    clip: ClipSearch = dataclasses.field(default_factory=ClipSearch)

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any]:
        ratios = self.clip.block_ratios(ctx)
        linears = ctx.linears
        for name, pair in ratios.items():
            layer = linears[name]
            layer.kernel.set_value(clamp_to_ratios(layer.kernel.get_value(), ctx.schemes[name].group_size, pair))
        return {"clipped": sorted(ratios),
                "mean_ratio": {name: round(float(jnp.mean(jnp.stack(pair))), 4) for name, pair in sorted(ratios.items())}}


def make_student(model: CausalLM, layout: Mapping[str, QuantScheme], *, windows: np.ndarray | None = None,
                 calibration: Calibration | None = None, clip: ClipSearch | None = ClipSearch(),
                 progress: bool = True) -> tuple[CausalLM, dict]:
    """A copy of the float ``model`` with the layers of ``layout`` in fake-quant training mode, clamped by the
    clipping search on ``windows`` (token ids (S, L)) when ``clip`` is given. Returns (student, report)."""
    linears = model.linear_layers()
    unknown = sorted(set(layout) - set(linears))
    if unknown:
        raise InputError(f"the layout names layers this model does not have: {unknown[:3]}")
    if any(linears[p].is_quantized for p in layout):
        raise InputError("quantization-aware training starts from a float model; this one is already packed")
    report: dict = {}
    if clip is not None:
        if windows is None or calibration is None:
            raise InputError("the clipping init needs calibration windows (or pass clip=None)")
        student, report, _ = driver.run(ModelWeights(model), model.cfg, layout, ClipInit(clip=clip), windows,
                                        calibration, dtype=model.dtype, progress=progress)
    else:
        student = nnx.clone(model)
    student.checkpoint_info = model.checkpoint_info
    for path, layer in student.linear_layers().items():
        if path in layout:
            layer.enable_fake_quant(layout[path].with_activations(None, None))
    return student, report


def trainable_filter(path, value) -> bool:
    """nnx filter: every `nnx.Param` except the embeddings and the LM head."""
    return isinstance(value, nnx.Param) and path[0] not in FROZEN


def export_student(student: CausalLM) -> CausalLM:
    """The packed model: every fake-quant layer quantized (RTN of its latent weight, which is exactly the weight
    its forward used). The student is left unchanged."""
    out = nnx.clone(student)
    out.checkpoint_info = student.checkpoint_info
    for layer in out.linear_layers().values():
        if layer.train_scheme is not None:
            layer.quantize(layer.train_scheme)
    return out

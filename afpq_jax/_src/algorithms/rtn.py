"""RTN (round to nearest) as a method, optionally after the two-sided clipping search.

Plain RTN needs no calibration data: blocks stream straight from the checkpoint and every layer is quantized with
its own scheme (`QuantScheme.quantize`). With ``clip`` the block's quantized layers first get their per-group
shrink ratios from `algorithms.clip` on calibration inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.calibration.method import BlockContext, Method, register_method


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(Method):
    name: ClassVar[str] = "rtn"
    clip: ClipSearch | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", ClipSearch.coerce(self.clip, "RTN.clip"))

    @property
    def calibrated(self) -> bool:
        return self.clip is not None

    def validate(self) -> None:
        if self.clip is not None:
            self.clip.validate()

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any] | None:
        ratios = {}
        if self.clip is not None:
            with ctx.timer("clip search"):
                ratios = self.clip.block_ratios(ctx)
        with ctx.timer("quantize"):
            global_scales = ctx.shared_global_scales()
            for name, s in ctx.schemes.items():
                # weights only: the activation step (`activations.WithActivations`) sets each input's scheme
                jax.block_until_ready(ctx.linears[name].quantize(s.with_activations(None, None), ratios.get(name),
                                                                 global_scales.get(name)))
        return None

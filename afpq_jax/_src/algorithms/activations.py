"""W·A8 calibration (FPTQ, SmoothQuant): which layers get static or dynamic int8 activations, the equalization
folds that make static scales safe, and the calibrated per-tensor scales.

`ActivationQuant` is the policy; `WithActivations` wraps any weight method (rtn / gptq / awq) on the method
registry. Per block it

1. reads each quantized layer's per-channel max|x| over all calibration tokens (the `ABS_MAX` statistic) and picks
   the layer's activation mode: with FPTQ's relative rule (the default) LAE wherever it folds, the mode decided in
   step 4; with the paper's absolute rule by the per-tensor max m (m < lo: static; lo <= m < hi: LAE, then
   static; m >= hi: dynamic per token); or one mode everywhere ("static", "dynamic"), or SmoothQuant;
2. folds the equalization scales into the preceding op (`algorithms.folds`): LAE s_j = m_j / log2(2 + m_j)
   (FPTQ), SmoothQuant s_j = m_j^alpha / max|W_j|^(1 - alpha); the statistics the weight method asked for are
   rescaled exactly (x' = x / s);
3. runs the weight method on the folded block;
4. measures every static layer's input max|x| again on the finished block (its inputs now come through the
   folded, quantized layers before it; `Method.observe`: in the driver's forward pass over the finished block,
   not an extra pass) and stores ``input_scale = max|x| / 127`` (the relative rule first compares that max
   with the median token's max|x| to choose static or dynamic).

Layers of a scaling group share one input, so they share one decision. A layer outside every foldable group
(BLOOM's attention dense) that the rule sends to LAE gets static without LAE, and the report says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src import validation
from afpq_jax._src.algorithms.folds import ScalingGroup, fold_scale, get_path, scaling_groups, tie_heads
from afpq_jax._src.calibration.method import BlockContext, Method
from afpq_jax._src.calibration.taps import ABS_MAX, TOKEN_MAX_HIST, histogram_quantile
from afpq_jax._src.errors import InputError
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.scheme import ACT_BITS, QuantScheme

ACT_SCHEMES = ("fptq", "static", "dynamic", "smoothquant")
RULES = ("absolute", "relative")
PAPER_THRESHOLDS = (15.0, 150.0)  # FPTQ's, set for LLaMA-7B
INT8_MAX = 127.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationQuant:
    """How the inputs of the quantized layers are quantized (int8, symmetric).

    scheme: "fptq" (a layer-wise rule), "static" (per-tensor static everywhere), "dynamic" (per-token dynamic
        everywhere), "smoothquant" (SmoothQuant folds with ``alpha``, then per-token dynamic).
    rule: for "fptq", "relative" (the default: scale-free, it holds on models whose activation magnitudes differ
        from LLaMA-7B's) — LAE wherever it folds, then static if the layer's equalized input max|x| is at most
        ``max_token_ratio`` times its median token's max|x| (a static scale then costs at most log2(ratio) bits of
        resolution on a typical token), else per-token dynamic; or "absolute" (the paper) — ``thresholds`` on the
        layer's calibration max|x|. Measured (INT4-asym g128 RTN, perplexity W4A16 -> W4A8): SmolLM2-135M +2.7%
        relative vs +14.1% absolute; Gemma 3 270M -18.0% relative (LAE's rescaling helps the weights) vs +1.9%.
    thresholds: the absolute rule's (lo, hi) on max|x|; None: the paper's (15, 150). Given with another rule or
        scheme (where nothing would read them) they are refused, not ignored.
    alpha: SmoothQuant's migration strength.
    """

    scheme: str = "fptq"
    bits: int = 8
    thresholds: tuple[float, float] | None = None
    rule: str = "relative"
    max_token_ratio: float = 8.0
    alpha: float = 0.5

    def validate(self) -> None:
        if self.scheme not in ACT_SCHEMES:
            raise InputError(f"unknown activation scheme {self.scheme!r}; choose one of {', '.join(ACT_SCHEMES)}")
        if self.bits not in ACT_BITS:
            raise InputError(f"activation bits must be one of {ACT_BITS}, got {self.bits!r}")
        if self.thresholds is not None:
            if isinstance(self.thresholds, (str, bytes)) or len(self.thresholds) != 2:
                raise InputError(f"activation thresholds must be a pair (lo, hi), got {self.thresholds!r}")
            lo, hi = (validation.number(t, "activation threshold") for t in self.thresholds)
            if not 0 <= lo <= hi:
                raise InputError(f"activation thresholds must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
            if self.scheme != "fptq" or self.rule != "absolute":
                raise InputError(f"activation thresholds apply to scheme 'fptq' with rule 'absolute' (this is "
                                 f"{self.scheme!r}{', rule ' + repr(self.rule) if self.scheme == 'fptq' else ''}); "
                                 f"pass rule='absolute' or drop the thresholds")
        if not 0.0 <= validation.number(self.alpha, "SmoothQuant alpha") <= 1.0:
            raise InputError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        if self.rule not in RULES:
            raise InputError(f"unknown FPTQ rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if not self.max_token_ratio >= 1.0:
            raise InputError(f"max_token_ratio must be at least 1, got {self.max_token_ratio}")

    @property
    def absolute_thresholds(self) -> tuple[float, float]:
        """The absolute rule's (lo, hi): ``thresholds``, or the paper's."""
        return PAPER_THRESHOLDS if self.thresholds is None else tuple(self.thresholds)

    @property
    def calibrated(self) -> bool:
        return self.scheme != "dynamic"

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "bits": self.bits, "thresholds": list(self.absolute_thresholds),
                "rule": self.rule, "max_token_ratio": self.max_token_ratio, "alpha": self.alpha}

    def decide(self, max_abs: float) -> tuple[str, str | None]:
        """(activation mode, fold) for a layer whose calibration max|x| is ``max_abs``; fold is "lae",
        "smoothquant" or None; mode "auto" (relative rule) is decided on the finished block's inputs."""
        if self.scheme == "static":
            return "static", None
        if self.scheme == "dynamic":
            return "dynamic", None
        if self.scheme == "smoothquant":
            return "dynamic", "smoothquant"
        if self.rule == "relative":
            return "auto", "lae"
        lo, hi = self.absolute_thresholds
        if max_abs < lo:
            return "static", None
        if max_abs < hi:
            return "static", "lae"
        return "dynamic", None


def relative_mode(stats: dict[str, jax.Array], max_token_ratio: float) -> tuple[str, float]:
    """The relative rule on a layer's (equalized) input statistics (`ABS_MAX`, `TOKEN_MAX_HIST`): (mode, ratio of
    the layer's max|x| to its median token's max|x|); static iff the ratio is at most ``max_token_ratio``."""
    m = float(jnp.max(stats["abs_max"]))
    ratio = m / histogram_quantile(stats["token_max_hist"], 0.5) if m > 0 else 1.0
    return ("static" if ratio <= max_token_ratio else "dynamic"), ratio


def lae_scales(max_abs: jax.Array) -> jax.Array:
    """FPTQ's logarithmic activation equalization: s_j = m_j / log2(2 + m_j) (1 for channels that are always 0)."""
    m = jnp.asarray(max_abs, jnp.float32)
    return jnp.where(m > 0, m / jnp.log2(2.0 + m), 1.0)


def smoothquant_scales(max_abs: jax.Array, weight_max: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant: s_j = m_j^alpha / max|W_j|^(1 - alpha), with both maxima floored at 1e-5."""
    m = jnp.maximum(jnp.asarray(max_abs, jnp.float32), 1e-5)
    w = jnp.maximum(jnp.asarray(weight_max, jnp.float32), 1e-5)
    return m ** alpha / w ** (1.0 - alpha)


def rescale_statistics(stats: dict[str, jax.Array], s: jax.Array) -> dict[str, jax.Array]:
    """Statistics of x as statistics of x' = x / s (exact up to float rounding)."""
    out = {}
    for name, v in stats.items():
        if name == "xtx":
            out[name] = v / s[:, None] / s[None, :]
        elif name in ("abs_max", "abs_sum"):
            out[name] = v / s
        else:
            raise NotImplementedError(f"cannot rescale statistic {name!r} under an equalization fold")
    return out


def _act_groups(cfg: ModelConfig, schemes: dict[str, QuantScheme]) -> list[ScalingGroup]:
    """Every quantized layer in exactly one group: the foldable groups whose layers are all quantized, then a
    single-layer group (prev "") for each remaining layer (decided alone, never folded)."""
    groups = [g for g in scaling_groups(cfg, gqa=True) if all(n in schemes for n in g.layers)]
    grouped = {n for g in groups for n in g.layers}
    return groups + [ScalingGroup("", (n,), n) for n in schemes if n not in grouped]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WithActivations(Method):
    """A weight method plus int8 activation quantization (the layers' ``act_*`` fields and ``input_scale``).

    A layer whose scheme already names an activation mode (a rules file's ``act_bits`` / ``act_mode``) keeps it,
    without folds; the others follow ``activations`` (None: they keep float activations).
    """

    name: ClassVar[str] = "with-activations"
    weights: Method
    activations: ActivationQuant | None
    explicit_static: bool = False  # some rule asks for a static layer: calibration is needed

    @property
    def calibrated(self) -> bool:
        return self.weights.calibrated or self.explicit_static or (
            self.activations is not None and self.activations.calibrated)

    @property
    def _decides_from_statistics(self) -> bool:
        """Whether the policy folds and decides from max|x| before the weights are quantized (static scales alone
        do not: they are observed on the finished block)."""
        return self.activations is not None and self.activations.scheme in ("fptq", "smoothquant")

    def validate(self) -> None:
        self.weights.validate()
        if self.activations is not None:
            self.activations.validate()

    def statistics(self):
        own = (ABS_MAX,) if self._decides_from_statistics else ()
        return tuple(dict.fromkeys(self.weights.statistics() + own))

    def prepare_config(self, cfg: ModelConfig) -> ModelConfig:
        cfg = self.weights.prepare_config(cfg)
        if self._decides_from_statistics and cfg.mlp == "gelu":
            cfg = dataclasses.replace(cfg, mlp_act_scale=True)  # BLOOM: GELU -> dense_4h_to_h is foldable
        return cfg

    def to_json(self) -> dict[str, Any]:
        return self.weights.to_json()

    def _decide_group(self, group: ScalingGroup, ctx: BlockContext, stats) -> tuple[dict, str | None]:
        """({layer: (mode, max|x| or None)}, fold) for one group."""
        amax = stats.get(group.layers[0], {}).get("abs_max")
        max_abs = None if amax is None else float(jnp.max(amax))
        explicit = {n: ctx.schemes[n].act_mode for n in group.layers if ctx.schemes[n].act_mode is not None}
        if explicit or self.activations is None:
            return {n: (explicit.get(n), max_abs) for n in group.layers}, None
        mode, fold = self.activations.decide(0.0 if max_abs is None else max_abs)
        if fold is not None and not group.prev:
            fold = None  # nothing to fold into (e.g. BLOOM's attention dense)
        return {n: (mode, max_abs) for n in group.layers}, fold

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any] | None:
        stats = {n: dict(v) for n, v in ctx.stats.items()}
        decisions: dict[str, dict[str, Any]] = {}
        with ctx.timer("activation folds"):
            for group in _act_groups(ctx.cfg, ctx.schemes):
                modes, fold = self._decide_group(group, ctx, stats)
                if fold is not None:
                    a = tie_heads(stats[group.layers[0]]["abs_max"], group)
                    if fold == "lae":
                        s = lae_scales(a)
                    else:
                        w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(get_path(ctx.block, n).kernel.get_value()
                                                                    .astype(jnp.float32)), axis=1)
                                                   for n in group.layers]), axis=0)
                        s = tie_heads(smoothquant_scales(a, w_max, self.activations.alpha), group)
                    s = fold_scale(ctx.block, group, s)
                    for n in group.layers:
                        stats[n] = rescale_statistics(stats[n], s)
                for n, (mode, max_abs) in modes.items():
                    if mode is not None:
                        decisions[n] = {"mode": mode, "fold": fold,
                                        "max_abs": None if max_abs is None else round(max_abs, 4)}
        facts = self.weights.quantize_block(dataclasses.replace(ctx, stats=stats)) or {}
        ctx.notes["activations"] = decisions
        if not any(d["mode"] in ("static", "auto") for d in decisions.values()):
            self.finish_block(ctx, {})
            return {**facts, "activations": decisions} if decisions else (facts or None)
        return facts or None

    def observe(self, ctx: BlockContext):
        """Static and relative-rule layers: max|x| (and the token-max histogram) of the finished block's inputs,
        which come through the folded, quantized layers before them."""
        decisions = ctx.notes.get("activations", {})
        observed = tuple(n for n, d in decisions.items() if d["mode"] in ("static", "auto"))
        if not observed:
            return (), ()
        auto = any(decisions[n]["mode"] == "auto" for n in observed)
        return ((ABS_MAX, TOKEN_MAX_HIST) if auto else (ABS_MAX,)), observed

    def finish_block(self, ctx: BlockContext, stats) -> dict[str, Any] | None:
        decisions = ctx.notes.get("activations", {})
        bits = self.activations.bits if self.activations is not None else ACT_BITS[0]
        for n, d in decisions.items():
            if d["mode"] == "auto":
                d["mode"], ratio = relative_mode(stats[n], self.activations.max_token_ratio)
                d["token_ratio"] = round(ratio, 2)
            scale = None
            if d["mode"] == "static":
                m = float(jnp.max(stats[n]["abs_max"]))
                d["input_max"] = round(m, 4)
                scale = np.float32(m / INT8_MAX) if m > 0 else np.float32(1.0)
            ctx.linears[n].set_activation_quant(bits, d["mode"], scale)
        return {"activations": decisions} if decisions else None


def with_activations(method: Method, activations: ActivationQuant | None,
                     layout: dict[str, QuantScheme]) -> Method:
    """``method`` that also quantizes activations, if the policy or any layer's scheme asks for it (else
    ``method`` itself). Every quantized layer's format must have an integer path (NF has none)."""
    if activations is not None and not isinstance(activations, ActivationQuant):
        raise InputError(f"activations must be an afpq_jax.ActivationQuant, got {type(activations).__name__}")
    explicit = [s for s in layout.values() if s.quantizes_activations]
    if activations is None and not explicit:
        return method
    if activations is not None:
        activations.validate()
        for path, scheme in layout.items():
            if not scheme.quantizes_activations:
                try:
                    scheme.with_activations(activations.bits, "dynamic")
                except InputError as e:
                    raise InputError(f"layer {path}: {e}") from None
    return WithActivations(weights=method, activations=activations,
                           explicit_static=any(s.act_mode == "static" for s in explicit))

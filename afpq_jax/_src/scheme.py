"""What to quantize and how: `QuantScheme` (one layer's weight format) and `QuantRule` (module path -> scheme).

A conversion's *layout* is the mapping {layer path: scheme} that `resolve_rules` derives from an ordered list of
rules over the model's linear-layer paths (``layers.3.attn.q_proj``, ``layers.3.mlp.down_proj``, ``lm_head``):
the first rule whose pattern matches the whole path decides; ``scheme=None`` keeps the layer float; a layer no
rule matches stays float. This is the convention of qwix's rules. Rules files are JSON (`load_rules`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from afpq_jax._src import formats as formats_lib
from afpq_jax._src import quantizer
from afpq_jax._src.errors import InputError
from afpq_jax._src.io.files import read_text
from afpq_jax._src.qtensor import QuantizedTensor

logger = logging.getLogger("afpq_jax")


# Micro-scaled FP4 (the formats serving stacks run): `QuantScheme.preset`.
PRESETS = {
    "nvfp4": {"format": "fp4_e2m1", "group_size": 16, "scale_dtype": "float8_e4m3fn"},
    "mxfp4": {"format": "fp4_e2m1", "group_size": 32, "scale_dtype": "float8_e8m0fnu"},
}

ACT_BITS = (8,)
ACT_MODES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """How one layer is quantized (static and hashable; recorded per layer in quantization_config.json).

    format: canonical format name (`afpq_jax.formats.available_formats`); group_size: input rows per scale group,
    None = one group per output column; asym: AFPQ two-scale (FP/NF) or min/max affine (INT) instead of absmax;
    scale_dtype: storage dtype of the scales: float16 / bfloat16 / float32, or the micro-scaled formats'
    float8_e4m3fn (under one float32 global scale per tensor, NVFP4's) and float8_e8m0fnu (powers of two, OCP
    MX's); `preset` names the two FP4 ones. `create` canonicalises aliases ("fp4" -> "fp4_e2m1").
    integer_scales: group scales as small integers times one ``scale_dtype`` scale per output column (QServe's
    progressive group quantization; `QuantizedTensor.channel_scale`): with int8 activations the whole matmul is
    one int8 GEMM with a per-column epilogue. Needs a format with integer levels (`Format.integer_scale_max`).

    act_bits / act_mode: activation quantization of the layer's input — None / None keeps activations in the
    compute dtype (W4A16); 8 / "static" is symmetric int8 with one calibrated per-tensor scale (the layer's
    ``input_scale``), 8 / "dynamic" symmetric int8 with a scale per token computed at run time. With int8
    activations the matmul runs on integers (`afpq_jax.kernels.quantized_matmul_a8`), which needs a weight format
    whose levels are small integers up to one factor (`Format.int8_multiplier`: INT, FP4 E2M1, FP3 E2M0; not NF).

    act_order_groups: the groups were formed in activation order (a GPTQ ``desc_act`` checkpoint's ``g_idx``): the
    weight's input rows are stored permuted so each group is contiguous, and the layer gathers its input by its
    ``input_perm`` first (`QuantDense`). Only imported checkpoints have it; afpq-jax's own GPTQ keeps static
    groups (its ``act_order`` orders the solve, not the storage).
    """

    format: str
    group_size: int | None = 128
    asym: bool = True
    scale_dtype: str = "float16"
    integer_scales: bool = False
    act_bits: int | None = None
    act_mode: str | None = None
    act_order_groups: bool = False

    def __post_init__(self) -> None:
        # Aliases ("fp4") and dtype spellings become canonical names, so equal schemes compare, hash and print
        # alike however they were written; an invalid scheme cannot be built.
        object.__setattr__(self, "format", formats_lib.get_format(self.format).name)
        object.__setattr__(self, "scale_dtype", quantizer.check_scale_dtype(self.scale_dtype).name)
        for name in ("group_size", "act_bits"):  # a numpy integer would not go into quantization_config.json
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        self.validate()

    def validate(self) -> None:
        """Raises `InputError` naming the first invalid field (construction already calls it)."""
        fmt = formats_lib.get_format(self.format)
        quantizer.check_group_size(self.group_size)
        quantizer.check_scale_dtype(self.scale_dtype)
        if not isinstance(self.asym, bool):
            raise InputError(f"QuantScheme.asym must be true or false, got {self.asym!r}")
        if not isinstance(self.act_order_groups, bool):
            raise InputError(f"QuantScheme.act_order_groups must be true or false, got {self.act_order_groups!r}")
        if not isinstance(self.integer_scales, bool):
            raise InputError(f"QuantScheme.integer_scales must be true or false, got {self.integer_scales!r}")
        if self.integer_scales:
            quantizer.integer_scale_limit(fmt, self.asym)
            quantizer.check_integer_scale_dtype(self.scale_dtype)
        if self.act_bits is None and self.act_mode is None:
            return
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, numbers.Integral) or \
                self.act_bits not in ACT_BITS:
            raise InputError(f"act_bits must be one of {ACT_BITS} (or null for float activations), got "
                             f"{self.act_bits!r}")
        if self.act_mode not in ACT_MODES:
            raise InputError(f"act_mode must be one of {ACT_MODES} with act_bits={self.act_bits}, got "
                             f"{self.act_mode!r}; this afpq-jax knows no other activation scheme")
        if fmt.int8_multiplier() is None:
            raise InputError(f"{fmt.name} levels have no exact int8 representation, so int8 activations cannot "
                             f"run on the integer path; use int4 or fp4_e2m1 weights (or float activations)")

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits is not None

    def with_activations(self, act_bits: int | None, act_mode: str | None) -> QuantScheme:
        """This weight scheme with another activation scheme ((None, None): float activations)."""
        return dataclasses.replace(self, act_bits=act_bits, act_mode=act_mode)

    @classmethod
    def preset(cls, name: str, *, asym: bool = False) -> QuantScheme:
        """A micro-scaled FP4 preset (`PRESETS`): ``nvfp4`` (FP4 E2M1, groups of 16, E4M3 scales under a float32
        global scale; 4.5 bits per weight, 5.0 with AFPQ's second scale) or ``mxfp4`` (groups of 32, E8M0
        power-of-two scales; 4.25 / 4.5). ``asym=True``: AFPQ's s_pos / s_neg, both in the preset's scale
        format (under the same global scale)."""
        if name not in PRESETS:
            raise InputError(f"unknown scheme preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name], asym=asym)

    @classmethod
    def create(cls, format: str, *, group_size: int | None = 128, asym: bool = True,
               scale_dtype: str = "float16", integer_scales: bool = False, act_bits: int | None = None,
               act_mode: str | None = None, act_order_groups: bool = False) -> QuantScheme:
        """The scheme, keyword for keyword (the constructor does the same; kept as the documented spelling)."""
        return cls(format=format, group_size=group_size, asym=asym, scale_dtype=scale_dtype,
                   integer_scales=integer_scales, act_bits=act_bits, act_mode=act_mode,
                   act_order_groups=act_order_groups)

    def to_json(self) -> dict[str, Any]:
        """The JSON object recorded per layer in quantization_config.json (`from_json` reads it back)."""
        out = dataclasses.asdict(self)
        if self.act_bits is None:  # schemes without the newer options keep the JSON of earlier versions
            del out["act_bits"], out["act_mode"]
        if not self.integer_scales:
            del out["integer_scales"]
        if not self.act_order_groups:
            del out["act_order_groups"]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> QuantScheme:
        """A scheme from its `to_json` form; missing keys take the defaults, unknown keys are an error."""
        if not isinstance(obj, Mapping):
            raise InputError(f"a scheme must be a JSON object like {{\"format\": \"nf3\", \"group_size\": 128}}, "
                             f"got {obj!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"unknown scheme key(s) {unknown}; allowed: {sorted(known)}")
        if "format" not in obj:
            raise InputError(f"scheme {dict(obj)} has no \"format\"")
        return cls.create(**obj)

    def __str__(self) -> str:
        group = "channel" if self.group_size is None else str(self.group_size)
        act = "" if self.act_bits is None else f"-a{self.act_bits}{self.act_mode}"
        ints = "-intscales" if self.integer_scales else ""
        # micro-scaled scale formats are named; 16/32-bit float scales are not (the names of earlier versions)
        scales = f"-{self.scale_dtype}" if self.scale_dtype.startswith("float8") else ""
        order = "-actorder" if self.act_order_groups else ""
        return f"{self.format}-{'asym' if self.asym else 'sym'}-g{group}{scales}{ints}{order}{act}"

    def fake_quant(self, w: jax.Array) -> jax.Array:
        """``dequantize(self.quantize(w))`` without packing, with a straight-through (identity) gradient."""
        return quantizer.fake_quant(w, self.format, group_size=self.group_size, asym=self.asym,
                                    scale_dtype=self.scale_dtype, integer_scales=self.integer_scales)

    def quantize(self, w: jax.Array, clip_ratios=None, global_scale=None) -> QuantizedTensor:
        """Round-to-nearest quantization of a kernel with this scheme (``clip_ratios``, ``global_scale``:
        `quantize`'s)."""
        return quantizer.quantize(w, self.format, group_size=self.group_size, asym=self.asym,
                                  scale_dtype=self.scale_dtype, clip_ratios=clip_ratios,
                                  integer_scales=self.integer_scales, global_scale=global_scale)

    def global_scale(self, weights) -> jax.Array | None:
        """The one E4M3 global scale of ``weights`` quantized with this scheme together (`shared_global_scale`),
        or None for scale dtypes without one."""
        return quantizer.shared_global_scale(weights, self.format, group_size=self.group_size, asym=self.asym,
                                             scale_dtype=self.scale_dtype)


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` (a regular expression that must match a whole layer path) -> ``scheme`` (None: keep float)."""

    pattern: str
    scheme: QuantScheme | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise InputError(f"QuantRule pattern must be a string, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise InputError(f"QuantRule pattern {self.pattern!r} is not a valid regular expression ({e}); "
                             f"escape dots as \\. (e.g. layers\\.\\d+\\.mlp\\.down_proj)") from None
        if self.scheme is not None:
            if not isinstance(self.scheme, QuantScheme):
                raise InputError(f"QuantRule scheme must be a QuantScheme or None, got {type(self.scheme).__name__}")
            self.scheme.validate()

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "scheme": None if self.scheme is None else self.scheme.to_json()}


def default_rules(scheme: QuantScheme, *, quantize_lm_head: bool = False) -> list[QuantRule]:
    """One scheme for every linear layer of the decoder blocks; lm_head stays float unless asked."""
    head = [] if quantize_lm_head else [QuantRule("lm_head", None)]
    return head + [QuantRule(".*", scheme)]


def as_rules(rules: QuantScheme | QuantRule | Iterable[QuantRule]) -> list[QuantRule]:
    """Accepts a rule list, one rule, or one scheme (= `default_rules(scheme)`)."""
    if isinstance(rules, QuantScheme):
        return default_rules(rules)
    if isinstance(rules, QuantRule):
        return [rules]
    out = list(rules)
    bad = [r for r in out if not isinstance(r, QuantRule)]
    if bad:
        raise InputError(f"rules must be QuantRule objects (or one QuantScheme), got {type(bad[0]).__name__}")
    return out


def resolve_rules(rules: Sequence[QuantRule], paths: Iterable[str]) -> dict[str, QuantScheme]:
    """The layout {path: scheme} of the quantized layers, in ``paths`` order: first matching rule wins."""
    layout = {}
    for path in paths:
        for rule in rules:
            if rule.matches(path):
                if rule.scheme is not None:
                    layout[path] = rule.scheme
                break
    return layout


def unused_rules(rules: Sequence[QuantRule], paths: Iterable[str]) -> list[QuantRule]:
    """Rules that decide no layer (they match nothing, or only paths an earlier rule took): usually a typo."""
    used = set()
    for path in paths:
        for i, rule in enumerate(rules):
            if rule.matches(path):
                used.add(i)
                break
    return [r for i, r in enumerate(rules) if i not in used]


def rules_from_json(obj: Any) -> list[QuantRule]:
    """Rules from JSON: a list (or ``{"rules": [...]}``) of ``{"pattern": str, "scheme": {...} | null}``."""
    if isinstance(obj, Mapping) and set(obj) == {"rules"}:
        obj = obj["rules"]
    if not isinstance(obj, list) or not obj:
        raise InputError("a rules file holds a non-empty JSON list of {\"pattern\": ..., \"scheme\": {...} | null}")
    rules = []
    for i, item in enumerate(obj):
        if not isinstance(item, Mapping) or set(item) != {"pattern", "scheme"}:
            raise InputError(f"rule {i}: expected {{\"pattern\": str, \"scheme\": {{...}} | null}}, got {item!r}")
        try:
            scheme = None if item["scheme"] is None else QuantScheme.from_json(item["scheme"])
            rules.append(QuantRule(item["pattern"], scheme))
        except InputError as e:
            raise InputError(f"rule {i} ({item.get('pattern')!r}): {e}") from None
    return rules


def load_rules(path: str | os.PathLike) -> list[QuantRule]:
    """Reads a JSON rules file (see `rules_from_json`)."""
    p = Path(path)
    text = read_text(p, "rules file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"rules file {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return rules_from_json(obj)
    except InputError as e:
        raise InputError(f"rules file {p}: {e}") from None


def rules_to_json(rules: Sequence[QuantRule]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rules]


def resolve_layout(rules: Sequence[QuantRule], paths: Sequence[str]) -> dict[str, QuantScheme]:
    """{layer path: scheme} of ``rules`` over a model's linear-layer ``paths``: `resolve_rules`, plus a warning for
    each rule that decides no layer and an `InputError` if no layer is quantized."""
    layout = resolve_rules(rules, paths)
    for rule in unused_rules(rules, paths):
        if rule.scheme is None:
            continue  # keeping absent layers float is harmless (e.g. the lm_head rule on a tied model)
        logger.warning("quantization rule %r decides no layer of this model (layer paths look like %s)",
                       rule.pattern, paths[0])
    if not layout:
        raise InputError("the rules quantize no layer of this model; layer paths look like "
                         f"{paths[0]!r} (patterns must match the whole path)")
    return layout

"""Checkpoint-key -> model-parameter mapping, shared by every family (families only supply `KeyRule` tables)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """``pattern`` (full-match regex over HF key names) -> ``target`` (dotted model path, ``{i}`` = groups).

    ``target=None`` ignores the key; ``transpose`` turns torch's (out, in) Linear weight into a Flax kernel;
    ``unless_tied`` ignores the key when the model ties lm_head to the embeddings.
    """

    pattern: str
    target: str | None
    transpose: bool = False
    unless_tied: bool = False


def map_key(rules, key: str, tied: bool) -> tuple[tuple[Any, ...] | None, bool]:
    """Model path (tuple with int list indices) for a checkpoint key, or (None, False) to skip it.

    Raises KeyError for keys no rule covers.
    """
    for rule in rules:
        m = re.fullmatch(rule.pattern, key)
        if m is None:
            continue
        if rule.target is None or (rule.unless_tied and tied):
            return None, False
        dotted = rule.target.format(*m.groups())
        return tuple(int(p) if p.isdigit() else p for p in dotted.split(".")), rule.transpose
    raise KeyError(key)


def to_model_layout(arr: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(arr.T) if transpose else arr


def rope_settings(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items) from a transformers-4 (``rope_theta``/``rope_scaling``) or
    transformers-5 (``rope_parameters``) config."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = dict(scaling or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, tuple(sorted(scaling.items()))


def _template(pattern: str) -> str | None:
    """A key pattern as a format string (``model\\.layers\\.(\\d+)\\.x`` -> ``model.layers.{}.x``): an optional
    ``(?:prefix)?`` is written (the canonical name: BLOOM's ``transformer.``), each capturing group becomes a
    field; None for patterns that are not such plain templates (``.*rotary_emb...``)."""
    t = re.sub(r"\(\?:([^()]*)\)\?", r"\1", pattern)
    t = re.sub(r"\((?!\?)[^()]*\)", "{}", t)
    if re.search(r"[\\][^.]|[*+?\[\]()|^$]", t.replace(r"\.", "")):
        return None
    return t.replace(r"\.", ".")


def hf_key(rules, path: tuple[Any, ...], tied: bool) -> tuple[str, bool]:
    """The checkpoint key of model path ``path`` and whether its layout is transposed: the inverse of `map_key`
    (verified by mapping the key back). Raises KeyError for a path no rule produces."""
    dotted = ".".join(map(str, path))
    for rule in rules:
        if rule.target is None or (rule.unless_tied and tied):
            continue
        target = re.escape(rule.target).replace(r"\{", "{").replace(r"\}", "}")
        m = re.fullmatch(re.sub(r"\{\d+\}", r"(.+?)", target), dotted)
        template = _template(rule.pattern)
        if m is None or template is None:
            continue
        order = [int(i) for i in re.findall(r"\{(\d+)\}", rule.target)]
        groups: list[str] = [""] * (max(order) + 1 if order else 0)
        for i, value in zip(order, m.groups()):
            groups[i] = value
        key = template.format(*groups)
        if map_key(rules, key, tied) == (tuple(path), rule.transpose):
            return key, rule.transpose
    raise KeyError(dotted)

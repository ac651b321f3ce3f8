"""Perplexity on the held-out Wikipedia split: every perplexity table of the README, one driver.

    python -m benchmarks.perplexity TABLE [--rows KEY,KEY] [--report] [--model DIR] [--seq-len 2048]
        [--max-windows N] [--calib-samples N] [--calib-seqlen 512] [--out FILE] [--via-cli]

Tables (each is data: its rows, its results file, how its results are laid out as markdown):
  rtn      float vs RTN in the layout of AFPQ's Table 1 (rows INT4, NF4-sym, NF4-asym, FP4-sym, FP4-asym, INT3,
           NF3-sym, NF3-asym, FP3-sym, FP3-asym — INT = asym min/max, AutoGPTQ's baseline; columns per-channel,
           g128, g64). Row keys: ``float``, ``FORMAT:sym|asym:per-channel|g128|g64`` (``nf3:asym:g128``).
           Results: results/ppl_rtn.jsonl.
  methods  RTN / GPTQ / AWQ x {INT3, NF3-sym, NF3-asym, FP3-sym, FP3-asym, INT4, NF4-asym, INT2} at g128, then the
           best 3-bit result. Row keys ``METHOD:FORMAT:sym|asym`` (``gptq:nf3:asym``). Results:
           results/ppl_methods.jsonl; RTN rows are also read from results/ppl_rtn.jsonl.
  w4a8     int8 activations next to the same weights with float activations. Row keys WEIGHTS:METHOD:ACTIVATIONS
           with WEIGHTS int4 (asym g128), fp4 (fp4_e2m1 asym g128), int4-is / fp4-is (the same with integer group
           scales: uint8 multiples of a per-channel scale, one int8 GEMM per layer) or int8 (sym, per-channel:
           W8A8); METHOD rtn / gptq; ACTIVATIONS a16 (float), static, dynamic, fptq (the paper's thresholds
           15 / 150), fptq-lae (LAE wherever it folds, then the paper's rule), fptq-rel (the relative rule: LAE
           wherever it folds, static where max|x| <= 8 x the median token's max|x|), fptq-rel-a16 (the fptq-rel
           checkpoint with every layer's activations set back to float: the same LAE-folded weights as W4A16),
           smoothquant (alpha 0.5, per-token dynamic). Without --rows: int4 / fp4 RTN with every activation
           scheme, int8:rtn:a16 and int8:rtn:smoothquant. Each record adds the share of layers per activation
           mode and the max|x| profile per layer type. Results: results/ppl_w4a8.jsonl.
  micro    micro-scaled FP4: NVFP4 (g16, float8_e4m3fn scales under a per-tensor float32 scale) and MXFP4 (g32,
           float8_e8m0fnu scales), sym and AFPQ-asym, beside FP4 E2M1 g128 with fp16 scales, under RTN / GPTQ /
           AWQ, with the measured bits per weight. Row keys ``METHOD:nvfp4|mxfp4|fp4-g128:sym|asym``; without
           --rows the RTN rows. Results: results/ppl_micro.jsonl.
  gemma3   Gemma 3 270M (the built-in gemma3-270m), the SmolLM2 tables in one: float; RTN INT4 / NF4 / FP4 / NF3
           sym vs asym; GPTQ and AWQ + clip at 3 bits (NF3 sym / asym; INT3 and FP3 rows on request); W4A8
           (INT4-asym and FP4-asym RTN weights with the paper's FPTQ thresholds and the relative rule), all at
           g128. Row keys ``METHOD:FORMAT:sym|asym`` and ``METHOD:FORMAT:asym:ACTIVATIONS`` (``rtn:int4:asym:fptq``).
           Windows start with Gemma's BOS (``seq_len - 1`` text tokens each); 4 windows and 64 calibration
           samples by default (a Gemma forward over 2,048 tokens costs ~4x SmolLM2's here: its 262k vocabulary).
           Results: results/ppl_gemma3.jsonl.

``--rows`` takes keys or shell patterns (``'gptq:*'``, ``'*:nf3:asym'``); without it a table runs its default
rows. Every quantized layer is a decoder-block linear (embeddings / tied lm_head stay float), fp16 scales
(but for the micro table's float8 scales).

Protocol (all tables): the held-out Wikipedia split (disjoint from calibration), seq 2048, the first 8 windows
(`afpq_jax.eval.perplexity`; the table's own count where it sets one), each led by the tokenizer's BOS where it
puts one before every text (`afpq_jax.eval.bos_prefix`: Gemma; SmolLM2 has none); calibration
`afpq_jax.Calibration(text=<Wikipedia calibration split>, samples=128, seqlen=512, seed=0)` (GPTQ / AWQ, and the
activation statistics of W4A8 rows; the table's own sample count where it sets one). Each row is converted with
`afpq_jax.quantize_pretrained` in memory (what ``python -m afpq_jax.convert`` writes) — RTN rows too: the older
RTN driver swapped `afpq_jax.fake_quant` values into one float model's kernels, which dequantize bit for bit to
the same weights (the W4A8 int4:rtn:a16 row reproduced its INT4 g128 perplexity to the last digit), but a
conversion costs seconds against the minutes of scoring a row, and one path gives every row the same record
(conversion phases included). With ``--via-cli`` each calibrated conversion is instead that CLI under
``/usr/bin/time -v`` (its wall time and peak RSS are recorded) followed by loading the checkpoint it wrote; RTN
and float rows stay in memory, rows with int8 activations are not supported there.

Results are appended one JSON line per row (a rerun skips rows the file already has; ``--report`` only prints
the table of what it has). Each record carries ``table``, ``row``, ``method``, ``format`` / ``asym`` /
``group_size`` / ``integer_scales`` / ``weights`` (the scheme), ``activations``, the perplexity result,
``eval_seconds``, ``calib`` (samples x seqlen), ``convert_seconds``, ``phases`` and the ``commit`` of the code
that ran. Older records (written by the three drivers this one replaced: no ``table`` field) are keyed to rows by
what they measured — method, weight scheme, activations — like new ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import bos_prefix, perplexity
from benchmarks.experiment import Results, commit, format_label, heldout_ids

# ---- rows and tables ------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, aq.ActivationQuant | None] = {
    "a16": None,
    "static": aq.ActivationQuant(scheme="static"),
    "dynamic": aq.ActivationQuant(scheme="dynamic"),
    "fptq": aq.ActivationQuant(scheme="fptq", rule="absolute"),
    "fptq-lae": aq.ActivationQuant(scheme="fptq", rule="absolute", thresholds=(0.0, 150.0)),
    "fptq-rel": aq.ActivationQuant(scheme="fptq", rule="relative"),
    "fptq-rel-a16": aq.ActivationQuant(scheme="fptq", rule="relative"),  # same weights, activations set to float
    "smoothquant": aq.ActivationQuant(scheme="smoothquant"),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration: ``scheme`` (None: the float model) converted with ``method`` and the activation
    quantization named ``activations`` (a key of ACTIVATIONS; "a16" = float activations); with
    ``float_activations_after`` every layer's activations are set back to float after the conversion."""

    key: str
    scheme: aq.QuantScheme | None
    method: str = "rtn"
    activations: str = "a16"
    float_activations_after: bool = False

    @property
    def converts_via_cli(self) -> bool:
        """Whether ``--via-cli`` can convert this row: the CLI flags of activation schemes are not mapped."""
        return ACTIVATIONS[self.activations] is None

    @property
    def weights(self) -> str:
        return "float" if self.scheme is None else str(self.scheme)

    @property
    def config(self) -> tuple:
        """What the row measures (how records written by any driver are matched to it)."""
        return ("float",) if self.scheme is None else (self.method, self.weights, self.activations)


def record_config(record: dict) -> tuple | None:
    """`Row.config` of a results record: this driver's, or the older drivers' (ppl_rtn: format / asym /
    group_size; ppl_methods: + method; ppl_w4a8: weights / method / activations)."""
    weights = record.get("weights")
    if weights is None:
        if "format" not in record:
            return None
        if record["format"] == "float":
            return ("float",)
        try:
            weights = str(aq.QuantScheme.create(record["format"], group_size=record.get("group_size"),
                                                asym=bool(record.get("asym")),
                                                integer_scales=bool(record.get("integer_scales"))))
        except ValueError:  # a format this version does not know (InputError): not a row of any table
            return None
    if weights == "float":
        return ("float",)
    return (record.get("method", "rtn"), weights, record.get("activations", "a16"))


SMOLLM2 = "smollm2-135m-instruct"  # the model of every table but gemma3 (and of records without a model field)


@dataclasses.dataclass(frozen=True)
class Table:
    """A perplexity table: its rows (``default_rows``: the keys run without --rows; None = all), its results file
    (``also``: more files its rows are read from), ``render`` (the results by row key -> the printed lines) and
    ``extra`` (more record fields from the converted model)."""

    name: str
    rows: tuple[Row, ...]
    out: str
    render: Callable[[Table, dict[str, dict]], list[str]]
    default_rows: tuple[str, ...] | None = None
    also: tuple[str, ...] = ()
    extra: Callable[[aq.CausalLM], dict] | None = None
    model: str = SMOLLM2  # a key of `assets.BUILTIN_MODELS`
    max_windows: int = 8
    calib_samples: int = 128

    def row(self, key: str) -> Row:
        return {r.key: r for r in self.rows}[key]

    def key(self, record: dict) -> str | None:
        """The row a results record (new or old format) belongs to; None if it is not one of this table's (or
        measured another model: records before the ``model`` field are SmolLM2's)."""
        if record.get("model", SMOLLM2) != self.model:
            return None
        if record.get("table") == self.name and record.get("row") in {r.key for r in self.rows}:
            return record["row"]
        config = record_config(record)
        return next((r.key for r in self.rows if r.config == config), None)

    def select(self, patterns: str | Iterable[str] | None = None) -> list[Row]:
        """The rows matching any of ``patterns`` (keys or shell patterns, comma-separated; None: the defaults),
        in the table's order."""
        if patterns is None:
            keys = self.default_rows if self.default_rows is not None else [r.key for r in self.rows]
            return [self.row(k) for k in keys]
        if isinstance(patterns, str):
            patterns = patterns.split(",")
        patterns = [p.strip() for p in patterns if p.strip()]
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(r.key, p) for r in self.rows)]
        if unknown:
            raise ValueError(f"table {self.name!r} has no row {', '.join(unknown)} (rows: "
                             f"{', '.join(r.key for r in self.rows)})")
        return [r for r in self.rows if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]


def _sym(asym: bool) -> str:
    return "asym" if asym else "sym"


def _ppl(record: dict | None) -> str:
    return "—" if record is None else f"{record['perplexity']:.2f}"


# rtn: AFPQ's Table 1 layout
RTN_FORMATS = [("int4", True), ("nf4", False), ("nf4", True), ("fp4_e2m1", False), ("fp4_e2m1", True),
               ("int3", True), ("nf3", False), ("nf3", True), ("fp3_e2m0", False), ("fp3_e2m0", True)]
RTN_GROUPS = [None, 128, 64]


def _col(group: int | None) -> str:
    return "per-channel" if group is None else f"g{group}"


def _rtn_key(fmt: str, asym: bool, group: int | None) -> str:
    return f"{fmt}:{_sym(asym)}:{_col(group)}"


def _render_rtn(table: Table, done: dict[str, dict]) -> list[str]:
    f = done.get("float")
    head = ("float: not measured yet" if f is None else
            f"SmolLM2-135M-Instruct, held-out Wikipedia, seq {f['seq_len']}, {f['windows']} windows "
            f"({f['tokens']} predicted tokens). Float: {f['perplexity']:.2f}")
    lines = ["", head, "", "| RTN | " + " | ".join(_col(g) for g in RTN_GROUPS) + " |",
             "|---|" + "---|" * len(RTN_GROUPS)]
    for fmt, asym in RTN_FORMATS:
        cells = [_ppl(done.get(_rtn_key(fmt, asym, g))) for g in RTN_GROUPS]
        lines.append(f"| {format_label(fmt, asym)} | " + " | ".join(cells) + " |")
    return lines


RTN = Table(
    name="rtn", out="results/ppl_rtn.jsonl", render=_render_rtn,
    rows=(Row("float", None),) + tuple(
        Row(_rtn_key(fmt, asym, g), aq.QuantScheme.create(fmt, group_size=g, asym=asym))
        for fmt, asym in RTN_FORMATS for g in RTN_GROUPS))

# methods: RTN / GPTQ / AWQ at g128
METHOD_FORMATS = [("int3", True), ("nf3", False), ("nf3", True), ("fp3_e2m0", False), ("fp3_e2m0", True),
                  ("int4", True), ("nf4", True), ("int2", True)]
METHODS = ["rtn", "gptq", "awq"]


def _method_key(method: str, fmt: str, asym: bool) -> str:
    return f"{method}:{fmt}:{_sym(asym)}"


def _render_methods(table: Table, done: dict[str, dict]) -> list[str]:
    lines = ["", "| g128 | " + " | ".join(m.upper() for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for fmt, asym in METHOD_FORMATS:
        cells = [_ppl(done.get(_method_key(m, fmt, asym))) for m in METHODS]
        lines.append(f"| {format_label(fmt, asym)} | " + " | ".join(cells) + " |")
    three_bit = {key: r["perplexity"] for key, r in done.items()
                 if table.row(key).scheme.format in ("int3", "nf3", "fp3_e2m0")}
    if three_bit:
        best = table.row(min(three_bit, key=three_bit.get))
        lines += ["", f"best 3-bit: {best.method.upper()} {format_label(best.scheme.format, best.scheme.asym)} "
                      f"({three_bit[best.key]:.2f})"]
    return lines


METHODS_TABLE = Table(
    name="methods", out="results/ppl_methods.jsonl", render=_render_methods, also=("results/ppl_rtn.jsonl",),
    rows=tuple(Row(_method_key(m, fmt, asym), aq.QuantScheme.create(fmt, group_size=128, asym=asym), method=m)
               for m in METHODS for fmt, asym in METHOD_FORMATS))

# w4a8: int8 activations
W4A8_WEIGHTS = {"int4": ("int4", 128, True, False), "fp4": ("fp4_e2m1", 128, True, False),
                "int4-is": ("int4", 128, True, True), "fp4-is": ("fp4_e2m1", 128, True, True),
                "int8": ("int8", None, False, False)}
W4A8_METHODS = ["rtn", "gptq"]


def activation_profile(model: aq.CausalLM) -> dict:
    """Layers per activation mode / fold, and the median / max over blocks of max|x| (before folds) and of the
    relative rule's token ratio, per layer type."""
    record = json.loads(model.checkpoint_info.quantization)
    per_type: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    modes: dict[str, int] = {}
    for block in (record.get("report") or {}).values():
        for name, d in block.get("activations", {}).items():
            key = f"{d['mode']}{'+' + d['fold'] if d.get('fold') else ''}"
            modes[key] = modes.get(key, 0) + 1
            if d.get("max_abs") is not None:
                per_type.setdefault(name.split(".")[-1], []).append(d["max_abs"])
            if d.get("token_ratio") is not None:
                ratios.setdefault(name.split(".")[-1], []).append(d["token_ratio"])

    def summary(values: dict[str, list[float]]) -> dict:
        return {t: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)} for t, v in values.items()}

    return {"modes": dict(sorted(modes.items())), "max_abs": summary(per_type), "token_ratio": summary(ratios)}


def _render_w4a8(table: Table, done: dict[str, dict]) -> list[str]:
    lines = ["", "| weights | method | " + " | ".join(ACTIVATIONS) + " |", "|---|---|" + "---|" * len(ACTIVATIONS)]
    for weights in W4A8_WEIGHTS:
        for method in W4A8_METHODS:
            base = done.get(f"{weights}:{method}:a16")
            cells = []
            for acts in ACTIVATIONS:
                r = done.get(f"{weights}:{method}:{acts}")
                if r is None:
                    cells.append("—")
                elif base is None or acts == "a16":
                    cells.append(f"{r['perplexity']:.2f}")
                else:
                    cells.append(f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%)")
            if any(c != "—" for c in cells):
                lines.append(f"| {weights} | {method} | " + " | ".join(cells) + " |")
    return lines


def _w4a8_row(weights: str, method: str, acts: str) -> Row:
    fmt, group, asym, integer_scales = W4A8_WEIGHTS[weights]
    return Row(f"{weights}:{method}:{acts}",
               aq.QuantScheme.create(fmt, group_size=group, asym=asym, integer_scales=integer_scales),
               method=method, activations=acts, float_activations_after=acts.endswith("-a16"))


W4A8 = Table(
    name="w4a8", out="results/ppl_w4a8.jsonl", render=_render_w4a8, extra=activation_profile,
    rows=tuple(_w4a8_row(w, m, a) for w in W4A8_WEIGHTS for m in W4A8_METHODS for a in ACTIVATIONS),
    default_rows=tuple([f"{w}:rtn:{a}" for w in ("int4", "fp4") for a in ACTIVATIONS]
                       + ["int8:rtn:a16", "int8:rtn:smoothquant"]))

# micro: micro-scaled FP4 (NVFP4 / MXFP4), symmetric and with AFPQ's second scale, beside FP4 g128 fp16 scales
MICRO_WEIGHTS = {"nvfp4": lambda asym: aq.QuantScheme.preset("nvfp4", asym=asym),
                 "mxfp4": lambda asym: aq.QuantScheme.preset("mxfp4", asym=asym),
                 "fp4-g128": lambda asym: aq.QuantScheme.create("fp4_e2m1", group_size=128, asym=asym)}


def _micro_key(method: str, weights: str, asym: bool) -> str:
    return f"{method}:{weights}:{_sym(asym)}"


def _render_micro(table: Table, done: dict[str, dict]) -> list[str]:
    lines = ["", "| weights | bits/weight | " + " | ".join(m.upper() for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for weights, make in MICRO_WEIGHTS.items():
        for asym in (False, True):
            cells = [_ppl(done.get(_micro_key(m, weights, asym))) for m in METHODS]
            bits = next((r["bits_per_weight"] for m in METHODS if (r := done.get(_micro_key(m, weights, asym)))
                         and "bits_per_weight" in r), None)
            lines.append(f"| {weights}-{_sym(asym)} | {'—' if bits is None else f'{bits:.3f}'} | "
                         + " | ".join(cells) + " |")
    return lines


def _bits_per_weight(model: aq.CausalLM) -> dict:
    weights, nbytes = model.quantized_size()
    return {"bits_per_weight": round(8 * nbytes / weights, 4)}


MICRO = Table(
    name="micro", out="results/ppl_micro.jsonl", render=_render_micro, extra=_bits_per_weight,
    also=("results/ppl_rtn.jsonl", "results/ppl_methods.jsonl"),
    rows=tuple(Row(_micro_key(m, w, asym), make(asym), method=m)
               for w, make in MICRO_WEIGHTS.items() for asym in (False, True) for m in METHODS),
    default_rows=tuple(_micro_key("rtn", w, asym) for w in MICRO_WEIGHTS for asym in (False, True)))

# gemma3: the SmolLM2 tables' headline rows on Gemma 3 270M
GEMMA_RTN_FORMATS = ["int4", "nf4", "fp4_e2m1", "nf3"]
GEMMA_3BIT_FORMATS = ["nf3", "int3", "fp3_e2m0"]
GEMMA_W4A8 = {"fptq": "FPTQ rule, paper thresholds", "fptq-rel": "relative rule"}


def _short(fmt: str) -> str:
    return fmt.split("_")[0].upper()  # fp4_e2m1 -> FP4


def _gemma_label(fmt: str, asym: bool) -> str:
    return f"{_short(fmt)}-{_sym(asym)}"


def _render_gemma3(table: Table, done: dict[str, dict]) -> list[str]:
    f = done.get("float")
    head = ("float: not measured yet" if f is None else
            f"Gemma 3 270M (GGUF Q4_K_M, dequantized), held-out Wikipedia, seq {f['seq_len']} (BOS + "
            f"{f['seq_len'] - 1} text tokens), {f['windows']} windows ({f['tokens']} predicted tokens). "
            f"Float: {f['perplexity']:.2f}")
    lines = ["", head, "", "| RTN g128 | sym | asym | asym vs sym |", "|---|---|---|---|"]
    for fmt in GEMMA_RTN_FORMATS:
        sym, asym = (done.get(_method_key("rtn", fmt, a)) for a in (False, True))
        gain = ("—" if sym is None or asym is None else
                f"{100 * (asym['perplexity'] / sym['perplexity'] - 1):+.1f}%")
        lines.append(f"| {_short(fmt)} | {_ppl(sym)} | {_ppl(asym)} | {gain} |")
    lines += ["", "| 3-bit g128 | " + " | ".join(m.upper() for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for fmt in GEMMA_3BIT_FORMATS:
        for asym in (False, True):
            cells = [_ppl(done.get(_method_key(m, fmt, asym))) for m in METHODS]
            if any(c != "—" for c in cells):
                lines.append(f"| {_gemma_label(fmt, asym)} | " + " | ".join(cells) + " |")
    lines += ["", "| W4A8, RTN g128 | W4A16 | " + " | ".join(GEMMA_W4A8.values()) + " |",
              "|---|---|" + "---|" * len(GEMMA_W4A8)]
    for fmt in ("int4", "fp4_e2m1"):
        base = done.get(_method_key("rtn", fmt, True))
        cells = [_ppl(base)]
        for acts in GEMMA_W4A8:
            r = done.get(f"{_method_key('rtn', fmt, True)}:{acts}")
            cells.append("—" if r is None else _ppl(r) if base is None else
                         f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%)")
        lines.append(f"| {_gemma_label(fmt, True)} | " + " | ".join(cells) + " |")
    return lines


def _gemma_rows() -> tuple[Row, ...]:
    g128 = lambda fmt, asym: aq.QuantScheme.create(fmt, group_size=128, asym=asym)  # noqa: E731
    rows = [Row("float", None)]
    rows += [Row(_method_key("rtn", fmt, a), g128(fmt, a)) for fmt in GEMMA_RTN_FORMATS for a in (False, True)]
    rows += [Row(_method_key(m, fmt, a), g128(fmt, a), method=m)
             for m in METHODS for fmt in GEMMA_3BIT_FORMATS for a in (False, True)
             if _method_key(m, fmt, a) not in {r.key for r in rows}]
    rows += [Row(f"{_method_key('rtn', fmt, True)}:{acts}", g128(fmt, True), activations=acts)
             for fmt in ("int4", "fp4_e2m1") for acts in GEMMA_W4A8]
    return tuple(rows)


GEMMA3 = Table(
    name="gemma3", out="results/ppl_gemma3.jsonl", render=_render_gemma3, model="gemma3-270m", max_windows=4,
    calib_samples=64, rows=_gemma_rows(), extra=activation_profile,
    default_rows=("float", *(_method_key("rtn", f, a) for f in GEMMA_RTN_FORMATS for a in (False, True)),
                  *(_method_key(m, "nf3", a) for m in ("gptq", "awq") for a in (False, True)),
                  *(f"rtn:int4:asym:{acts}" for acts in GEMMA_W4A8)))

TABLES: dict[str, Table] = {t.name: t for t in (RTN, METHODS_TABLE, W4A8, MICRO, GEMMA3)}

# ---- running ----------------------------------------------------------------------------------------------------


def convert_via_cli(model_path: str | Path, row: Row, calibration: aq.Calibration) -> tuple[aq.CausalLM, dict]:
    """Runs `python -m afpq_jax.convert` for ``row`` (under /usr/bin/time -v when present); returns (model,
    measurements: CLI wall time, phases, peak RSS, the commit the subprocess ran)."""
    if not row.converts_via_cli:
        raise ValueError(f"--via-cli converts weight-only rows; {row.key} quantizes activations")
    s = row.scheme
    out = Path(tempfile.mkdtemp(prefix="afpq_ppl_")) / "ckpt"
    cmd = [sys.executable, "-m", "afpq_jax.convert", "--model", str(model_path), "--format", s.format,
           "--group-size", "none" if s.group_size is None else str(s.group_size), "--method", row.method,
           "--calib-samples", str(calibration.samples), "--calib-seqlen", str(calibration.seqlen),
           "--seed", str(calibration.seed), "--out", str(out), "--no-progress",
           *([] if s.asym else ["--sym"]), *(["--integer-scales"] if s.integer_scales else []),
           *(["--scale-dtype", s.scale_dtype] if s.scale_dtype != "float16" else []),
           *(["--calib-random"] if calibration.random else [])]
    timed = Path("/usr/bin/time").exists()
    t0 = time.perf_counter()
    code = commit()  # the code the subprocess imports
    proc = subprocess.run((["/usr/bin/time", "-v"] if timed else []) + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    phase_line = proc.stdout.strip().splitlines()[-1]  # the summary's last line: "  embed 1.2s, gptq 3.4s, ..."
    phases = {k.strip(): float(v) for k, v in re.findall(r"([^,]+?) ([\d.]+)s(?:,|$)", phase_line)}
    measured = {"cli_wall_seconds": round(wall, 1), "phases": phases,
                "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None, "commit": code}
    model = aq.load(out)  # fully in memory
    shutil.rmtree(out.parent, ignore_errors=True)
    return model, measured


def run_row(table: Table, row: Row, model_path: str | Path, eval_ids: Any, calibration: aq.Calibration, *,
            seq_len: int = 2048, max_windows: int | None = 8, via_cli: bool = False,
            code: str | None = None, bos_token_id: int | None = None) -> dict[str, Any]:
    """Converts ``row`` (in memory, or with the CLI when ``via_cli`` and the method calibrates), scores it on
    ``eval_ids`` (windows led by ``bos_token_id`` when given) and returns its record. ``code``: the commit of the
    code imported (default: HEAD now)."""
    code = commit() if code is None else code
    s = row.scheme
    measured: dict[str, Any] = {"phases": {}}
    t0 = time.perf_counter()
    if s is None:
        model = aq.load(model_path)
    elif via_cli and row.method != "rtn":
        model, measured = convert_via_cli(model_path, row, calibration)
    else:
        model = aq.quantize_pretrained(model_path, aq.default_rules(s), method=row.method, calibration=calibration,
                                       activations=ACTIVATIONS[row.activations], progress=False)
        measured = {"phases": dict(model.checkpoint_info.phase_seconds)}
    convert_s = time.perf_counter() - t0
    if row.float_activations_after:
        for layer in model.linear_layers().values():
            if layer.is_quantized:
                layer.set_activation_quant(None, None)
    t0 = time.perf_counter()
    r = perplexity(model, eval_ids, seq_len=seq_len, max_windows=max_windows, progress=False,
                   bos_token_id=bos_token_id)
    eval_s = time.perf_counter() - t0
    scheme = ({"format": "float", "asym": None, "group_size": None, "integer_scales": None} if s is None else
              {"format": s.format, "asym": s.asym, "group_size": s.group_size, "integer_scales": s.integer_scales})
    return {"table": table.name, "model": table.model, "row": row.key,
            "method": None if s is None else row.method, **scheme,
            "weights": row.weights, "activations": row.activations, **r, "bos_token_id": bos_token_id,
            "eval_seconds": round(eval_s, 1),
            **(table.extra(model) if table.extra and s is not None else {}),
            "calib": f"{calibration.samples}x{calibration.seqlen}",
            "convert_seconds": None if s is None else round(convert_s, 1), "commit": code, **measured}


def load_results(table: Table, out: str | Path | None = None) -> Results:
    """``out`` (default: the table's file) and the table's other files, keyed by row."""
    return Results(out or table.out, key=table.key, also=table.also)


def run_table(table: Table, model_path: str | Path, eval_ids: Any, calibration: aq.Calibration, *,
              rows: str | Iterable[str] | None = None, out: str | Path | None = None, seq_len: int = 2048,
              max_windows: int | None = 8, via_cli: bool = False,
              bos_token_id: int | None = None) -> dict[str, dict]:
    """Runs the selected rows (`Table.select`) that the results file does not have yet, appending one record each;
    returns every result by row key."""
    selected = table.select(rows)
    if via_cli:
        bad = [r.key for r in selected if r.scheme is not None and r.method != "rtn" and not r.converts_via_cli]
        if bad:
            raise ValueError(f"--via-cli converts weight-only rows; {', '.join(bad)} quantize activations")
    results = load_results(table, out)
    code = commit()  # in-process rows run the code imported now
    for row in selected:
        if row.key not in results:
            results.add(run_row(table, row, model_path, eval_ids, calibration, seq_len=seq_len,
                                max_windows=max_windows, via_cli=via_cli, code=code, bos_token_id=bos_token_id))
    return results.done


def render(table: Table, done: dict[str, dict]) -> str:
    """The table as printed (markdown, with the table's notes)."""
    return "\n".join(table.render(table, done))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=list(TABLES))
    ap.add_argument("--rows", default=None, help="comma-separated row keys or shell patterns (default: the "
                                                  "table's rows)")
    ap.add_argument("--report", action="store_true", help="only print the table of what --out already has")
    ap.add_argument("--model", default=None, help="the table's model from another directory (default: the "
                                                   "built-in one, SmolLM2-135M-Instruct or Gemma 3 270M)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None, help="windows scored (default: the table's, 8 or 4)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the table's, 128 or 64")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", default=None, help="results file (default: the table's, results/ppl_TABLE.jsonl)")
    ap.add_argument("--via-cli", action="store_true",
                    help="convert calibrated rows with the CLI (timed, peak RSS) and load the checkpoint")
    args = ap.parse_args(argv)
    table = TABLES[args.table]
    if args.report:
        done = load_results(table, args.out).done
    else:
        try:
            table.select(args.rows)  # unknown rows fail before the model loads
        except ValueError as e:
            ap.error(str(e))
        model_path = args.model or str(assets.BUILTIN_MODELS[table.model]())
        calibration = aq.Calibration(text=assets.wiki_text()[0], seqlen=args.calib_seqlen, seed=0,
                                     samples=args.calib_samples or table.calib_samples)
        done = run_table(table, model_path, heldout_ids(model_path), calibration, rows=args.rows, out=args.out,
                         seq_len=args.seq_len, max_windows=args.max_windows or table.max_windows,
                         via_cli=args.via_cli, bos_token_id=bos_prefix(aq.load_tokenizer(model_path)))
    print(render(table, done))


if __name__ == "__main__":
    main()

"""The benchmarks package: the device check's dry run on CPU, the benchmark and autotune scripts, the perplexity
tables' driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax.eval import perplexity
from benchmarks import experiment
from benchmarks import perplexity as ppl

ROOT = Path(__file__).resolve().parents[1]


def _row_cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_device_check_dry_run(tmp_path):
    """Every step of the device check on CPU, in its device order, into one report: the headline table (kernels
    checked against xla, both timers), the backend's kernel tests in their own processes, the sweep, the
    autotune (which records its tiling)."""
    env = {k: v for k, v in os.environ.items() if k != "AFPQ_KERNELS_NATIVE"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = (tmp_path / "report.md").read_text()
    assert r.returncode == 0, report[-3000:]
    sections = ["## platform", "## headline", "## native kernel tests", "## sweep", "## autotune xla_scan"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "passed  tests/kernels/test_quantized_matmul.py::test_formats_match_reference[triton-int4-a-g128]" in report
    assert "FAILED" not in report and "WRONG" not in report
    headline = report[report.index("## headline"):report.index("## native kernel tests")]
    assert "| nf4-asym-g128 | 16 | xla |" in headline and "| dense | 1 | dense bf16 |" in headline
    # The profiler split (CPU: XLA's thunk timeline): the C++ kernel is a custom call, x's casts XLA-side ops.
    row = next(line for line in headline.splitlines() if line.startswith("| int4-asym-g128 | 1 | cpu |"))
    kernel, xla_side = (float(v) for v in _row_cells(row)[4:6])
    assert kernel > 0.0 and xla_side > 0.0
    # what dispatch picks, against the fastest implementation of the same case (the size rules' check)
    assert "dispatch (implementation=None) against the fastest" in report and "| int4-asym | 1 | cpu |" in report
    assert "asym over sym" in report[report.index("## sweep"):]
    assert "recorded 1 tiling(s)" in report
    assert "|xla_scan|int4-asym-g128|" in (tmp_path / "tuned_configs.json").read_text()
    assert report.rstrip().endswith("device check: all steps passed")


def test_device_check_stops_or_fails_loudly(tmp_path):
    """No working JAX: the check stops at the platform step. A later step that fails (here: a Python without
    jax) makes the whole check fail, and the report names it."""
    cmd = [sys.executable, "-m", "benchmarks.device_check", "--python", "/bin/false", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "STOPPED (JAX did not start)" in (tmp_path / "report.md").read_text()
    r = subprocess.run([*cmd, "--dry-run", "--steps", "sweep"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "SOME STEPS FAILED (sweep" in (tmp_path / "report.md").read_text()


def test_timed_loops_have_a_static_trip_count_and_rotate_past_l2():
    import jax
    import jax.numpy as jnp

    from benchmarks import quantized_matmul as bench
    # 8 weights at least; more when 8 would fit twice in the 50 MiB L2 (INT4-asym g128 at 4096^2: 8.9 MB -> 12)
    assert bench.rotation(9_000_000) == 12 and bench.rotation(40e6) == 8
    assert bench.rotation(1e3, minimum=1) * 1e3 >= 2 * bench.L2_BYTES
    f = bench.looped(lambda x, w: x @ w, 3)
    jaxpr = jax.make_jaxpr(f)([jnp.ones((1, 4))], [jnp.ones((4, 4))])
    (loop,) = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name in ("scan", "while")]
    assert loop.primitive.name == "scan" and loop.params["length"] == 3  # no traced predicate: no host sync


def test_benchmark_times_both_triton_decodes_when_asked():
    from benchmarks import quantized_matmul as bench
    both = bench.implementation_variants(["triton", "xla"], "both")
    assert [label for label, _ in both] == ["triton", "triton-tree", "xla"]
    assert both[0][1] is None and both[1][1].lookup is False and both[2][1] is None
    assert [label for label, _ in bench.implementation_variants(["triton"], "off")] == ["triton-tree"]
    assert bench.implementation_variants(["cpu", "xla"], "both") == [("cpu", None), ("xla", None)]
    gemv = bench.implementation_variants(["triton"], "on", triton_gemv=True)
    assert [label for label, _ in gemv] == ["triton", "triton-gemv"]
    assert [bench.variant_config("triton-gemv", None, m).block_m for m in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert "M <= 4" in bench.variant_config("triton-gemv", None, 16)
    # the launch each Triton row reports: programs / shared-memory KiB (decode at K = N = 4096: 8 splits x 64)
    import jax
    import jax.numpy as jnp

    from afpq_jax.kernels import Problem, resolve
    qt = jax.eval_shape(lambda w: aq.quantize(w, "int4", group_size=128), jax.ShapeDtypeStruct((4096, 4096), "float32"))
    prob = Problem.create((1, 4096), jnp.bfloat16, qt)
    assert bench.launch_summary("triton", prob, resolve("triton", prob, None)) == "512 / 42"
    assert bench.launch_summary("xla", prob, resolve("xla", prob, None)) == ""


def test_autotune_script_records_the_fastest_tiling(tmp_path):
    out = tmp_path / "table.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.autotune", "--impl", "xla_scan", "--m", "2",
                        "--k", "512", "--n", "256", "--formats", "int4", "--x-dtype", "float32", "--reps", "1",
                        "--out", str(out)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = __import__("json").loads(out.read_text())
    (key, fields), = table.items()
    assert key.endswith("|xla_scan|int4-asym-g128|float32|m2|k512|n256") and set(fields) == {"block_k"}
    assert "| int4-asym-g128 | 2 |" in r.stdout


MODEL = Path(__file__).parent / "fixtures" / "llama_gqa"  # HF LLaMA dir, vocab 256, context 128, no tokenizer


def _cells(text: str, label: str) -> list[str]:
    """The cells after the label of the markdown row that starts with ``| label |``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_rtn_row_records_skips_reruns_and_equals_an_independent_conversion(tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(0, 256, 200).astype(np.int32)
    calibration = aq.Calibration(random=True, samples=4, seqlen=16)
    out = tmp_path / "ppl.jsonl"
    kw = dict(rows="nf3:asym:per-channel", out=out, seq_len=32, max_windows=2)
    done = ppl.run_table(ppl.RTN, MODEL, ids, calibration, **kw)
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["table"] == "rtn" and record["row"] == "nf3:asym:per-channel"
    assert record["commit"] == experiment.commit() and record["calib"] == "4x16"
    assert record["method"] == "rtn" and record["weights"] == "nf3-asym-gchannel"
    assert record["convert_seconds"] >= 0 and record["phases"] and record["windows"] == 2
    assert done == {"nf3:asym:per-channel": record}

    def must_not_run(*a, **k):
        raise AssertionError("a row the results file already has ran again")

    monkeypatch.setattr(ppl, "run_row", must_not_run)
    assert ppl.run_table(ppl.RTN, MODEL, ids, calibration, **kw) == done
    assert out.read_text().splitlines() == lines

    scheme = aq.QuantScheme.create("nf3", group_size=None, asym=True)
    expected = perplexity(aq.quantize_pretrained(MODEL, scheme, method="rtn", progress=False), ids, seq_len=32,
                          max_windows=2, progress=False)["perplexity"]
    assert record["perplexity"] == expected
    table = ppl.render(ppl.RTN, ppl.load_results(ppl.RTN, out).done)
    assert _cells(table, "NF3-asym") == [f"{expected:.2f}", "—", "—"]
    assert _cells(table, "NF3-sym") == ["—", "—", "—"]


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_puts_each_rows_perplexity_in_its_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the methods table also reads results/ppl_rtn.jsonl: this one
    values = {}
    for t in ppl.TABLES.values():
        records = []
        for i, row in enumerate(t.rows):
            values[t.name, row.key] = 10.0 + i + 0.01 * len(t.name)  # distinct per row
            records.append({"table": t.name, "model": t.model, "row": row.key,
                            "perplexity": values[t.name, row.key], "seq_len": 32, "windows": 2, "tokens": 62})
        _write(Path(t.out), records)

    ppl.main(["rtn", "--report"])
    text = capsys.readouterr().out
    assert f"Float: {values['rtn', 'float']:.2f}" in text
    for fmt, asym in ppl.RTN_FORMATS:
        assert _cells(text, experiment.format_label(fmt, asym)) == [
            f"{values['rtn', ppl._rtn_key(fmt, asym, g)]:.2f}" for g in ppl.RTN_GROUPS]

    ppl.main(["methods", "--report"])
    text = capsys.readouterr().out
    for fmt, asym in ppl.METHOD_FORMATS:
        assert _cells(text, experiment.format_label(fmt, asym)) == [
            f"{values['methods', ppl._method_key(m, fmt, asym)]:.2f}" for m in ppl.METHODS]
    three_bit = {k: v for (t, k), v in values.items() if t == "methods" and k.split(":")[1] in ("int3", "nf3",
                                                                                                 "fp3_e2m0")}
    best = min(three_bit, key=three_bit.get)
    assert best == "rtn:int3:asym" and text.rstrip().endswith(f"best 3-bit: RTN INT3 ({three_bit[best]:.2f})")

    ppl.main(["w4a8", "--report"])
    text = capsys.readouterr().out
    for weights in ppl.W4A8_WEIGHTS:
        for method in ppl.W4A8_METHODS:
            base = values["w4a8", f"{weights}:{method}:a16"]
            line = next(ln for ln in text.splitlines() if ln.startswith(f"| {weights} | {method} |"))
            cells = [c.strip() for c in line.strip("|").split("|")][2:]
            assert cells == [f"{base:.2f}"] + [
                f"{values['w4a8', f'{weights}:{method}:{a}']:.2f} "
                f"({100 * (values['w4a8', f'{weights}:{method}:{a}'] / base - 1):+.1f}%)"
                for a in list(ppl.ACTIVATIONS)[1:]]


def test_gemma3_report_lays_out_sym_vs_asym_three_bit_methods_and_w4a8(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    g = ppl.GEMMA3
    values = {row.key: 10.0 + 0.5 * i for i, row in enumerate(g.rows)}
    _write(Path(g.out), [{"table": "gemma3", "model": "gemma3-270m", "row": k, "perplexity": v, "seq_len": 2048,
                          "windows": 4, "tokens": 8188} for k, v in values.items()])
    # a SmolLM2 record of the same row (no model field: the older records) is not Gemma's, nor the reverse
    smollm2 = {"table": "rtn", "row": "nf3:asym:g128", "method": "rtn", "weights": "nf3-asym-g128",
               "activations": "a16", "perplexity": 1.0}
    assert g.key(smollm2) is None and ppl.METHODS_TABLE.key(smollm2) == "rtn:nf3:asym"
    assert ppl.METHODS_TABLE.key({**smollm2, "table": "gemma3", "model": "gemma3-270m"}) is None
    ppl.main(["gemma3", "--report"])
    text = capsys.readouterr().out
    assert f"Float: {values['float']:.2f}" in text and "BOS + 2047 text tokens" in text
    for fmt, label in (("int4", "INT4"), ("nf4", "NF4"), ("fp4_e2m1", "FP4"), ("nf3", "NF3")):
        sym, asym = values[f"rtn:{fmt}:sym"], values[f"rtn:{fmt}:asym"]
        assert _cells(text, label) == [f"{sym:.2f}", f"{asym:.2f}", f"{100 * (asym / sym - 1):+.1f}%"]
    for fmt, label in (("nf3", "NF3"), ("int3", "INT3"), ("fp3_e2m0", "FP3")):
        for side in ("sym", "asym"):
            assert _cells(text, f"{label}-{side}") == [f"{values[f'{m}:{fmt}:{side}']:.2f}" for m in ppl.METHODS]
    base = values["rtn:int4:asym"]
    assert _cells(text, "INT4-asym") == [f"{base:.2f}"] + [
        f"{values[f'rtn:int4:asym:{a}']:.2f} ({100 * (values[f'rtn:int4:asym:{a}'] / base - 1):+.1f}%)"
        for a in ppl.GEMMA_W4A8]


def test_old_drivers_records_are_keyed_to_their_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = {"perplexity": 20.0, "nll": 3.0, "windows": 8, "seq_len": 2048, "tokens": 16376}
    rtn_file = [  # ppl_table: format / asym / group_size, no method
        {"format": "float", "asym": None, "group_size": None, **common, "seconds": 1.0},
        {"format": "nf3", "asym": True, "group_size": None, **common, "seconds": 1.0},
        {"format": "int4", "asym": True, "group_size": 128, **common, "seconds": 1.0},
        {"format": "fp4_e2m1", "asym": False, "group_size": 64, **common, "seconds": 1.0},
    ]
    methods_file = [  # ppl_methods: + method
        {"method": "gptq", "format": "nf3", "asym": True, "group_size": 128, **common, "calib": "128x512"},
        {"method": "awq", "format": "int2", "asym": True, "group_size": 128, **common, "calib": "128x512"},
        {"method": "gptq", "format": "nf3", "asym": True, "group_size": 64, **common, "calib": "128x512"},
    ]
    w4a8_file = [  # ppl_w4a8: row / weights / method / activations
        {"row": "fp4:rtn:fptq-rel-a16", "weights": "fp4_e2m1-asym-g128", "method": "rtn",
         "activations": "fptq-rel-a16", **common},
        {"row": "int4-is:rtn:dynamic", "weights": "int4-asym-g128-intscales", "method": "rtn",
         "activations": "dynamic", **common},
        {"row": "int8:rtn:smoothquant", "weights": "int8-sym-gchannel", "method": "rtn",
         "activations": "smoothquant", **common},
    ]
    keys = {t: [ppl.TABLES[t].key(r) for r in rtn_file + methods_file + w4a8_file] for t in ppl.TABLES}
    assert keys["rtn"] == ["float", "nf3:asym:per-channel", "int4:asym:g128", "fp4_e2m1:sym:g64",
                           None, None, None, None, None, None]
    assert keys["methods"] == [None, None, "rtn:int4:asym", None,
                               "gptq:nf3:asym", "awq:int2:asym", None, None, None, None]
    # the W4A8 table's int4:rtn:a16 row measures what the RTN table's INT4 g128 cell does
    assert keys["w4a8"] == [None, None, "int4:rtn:a16", None, None, None, None,
                            "fp4:rtn:fptq-rel-a16", "int4-is:rtn:dynamic", "int8:rtn:smoothquant"]

    _write(Path("results/ppl_rtn.jsonl"), rtn_file)
    _write(Path("results/ppl_methods.jsonl"), methods_file)
    _write(Path("results/ppl_w4a8.jsonl"), w4a8_file)
    assert list(ppl.load_results(ppl.RTN).done) == keys["rtn"][:4]
    assert list(ppl.load_results(ppl.METHODS_TABLE).done) == ["rtn:int4:asym", "gptq:nf3:asym", "awq:int2:asym"]
    assert list(ppl.load_results(ppl.W4A8).done) == [k for k in keys["w4a8"][7:]]
    # a new record of one table is keyed by its table / row, and by what it measured in the others
    new = {"table": "rtn", "row": "nf3:asym:g128", "method": "rtn", "format": "nf3", "asym": True,
           "group_size": 128, "integer_scales": False, "weights": "nf3-asym-g128", "activations": "a16", **common}
    assert [ppl.TABLES[t].key(new) for t in ppl.TABLES] == ["nf3:asym:g128", "rtn:nf3:asym", None, None, None]
    # the micro-scaled table's FP4 g128 rows are the RTN / methods tables' FP4 cells; no older record is NVFP4
    assert keys["micro"] == [None] * 10
    assert keys["gemma3"] == [None] * 10  # SmolLM2's records (no model field), whatever they measured
    fp4 = {"table": "rtn", "row": "fp4_e2m1:asym:g128", "method": "rtn", "weights": "fp4_e2m1-asym-g128",
           "activations": "a16", **common}
    assert ppl.MICRO.key(fp4) == "rtn:fp4-g128:asym"
    nvfp4 = {"table": "micro", "row": "gptq:nvfp4:asym", "method": "gptq",
             "weights": "fp4_e2m1-asym-g16-float8_e4m3fn", "activations": "a16", **common}
    assert [ppl.TABLES[t].key(nvfp4) for t in ppl.TABLES] == [None, None, None, "gptq:nvfp4:asym", None]


def test_rows_select_keys_and_patterns():
    assert [r.key for r in ppl.METHODS_TABLE.select("gptq:nf3:asym,awq:int2:asym")] == ["gptq:nf3:asym",
                                                                                         "awq:int2:asym"]
    assert [r.key for r in ppl.METHODS_TABLE.select("*:nf3:asym")] == [f"{m}:nf3:asym" for m in ppl.METHODS]
    assert len(ppl.METHODS_TABLE.select(None)) == 24 and len(ppl.RTN.select(None)) == 31
    assert [r.key for r in ppl.W4A8.select(None)][-2:] == ["int8:rtn:a16", "int8:rtn:smoothquant"]
    assert len(ppl.W4A8.select(None)) == 18 and ppl.W4A8.row("int4:rtn:fptq-rel-a16").float_activations_after
    with pytest.raises(ValueError, match="no row nf3:asym"):
        ppl.METHODS_TABLE.select("nf3:asym")  # the old ppl_methods --rows spelling: now method:format:sym|asym

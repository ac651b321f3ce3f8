"""`benchmarks/device_check.sh --dry-run`: the one-shot accelerator check runs its every step on CPU (interpret-mode
kernel tests, tiny benchmark shapes), so it cannot rot between the sessions that have a device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("AFPQ_KERNELS_NATIVE", None)
    r = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    report = (tmp_path / "report.md").read_text()
    assert r.returncode == 0, report[-3000:]
    for section in ("## versions and devices", "## kernel tests", "## decode/prefill sweep", "## Triton codebook",
                    "## group 64", "## per-channel", "## SmolLM2-135M MLP shape"):
        assert section in report
    assert "passed  tests/test_quantized_matmul.py::test_formats_match_reference[triton-int4-a-g128]" in report
    assert "FAILED" not in report and "WRONG" not in report
    assert "| int4-asym-g128 | 1 | xla |" in report and "asym over sym" in report
    # what dispatch picks, against the fastest implementation of the same case (the size rules' check)
    assert "dispatch (implementation=None) against the fastest" in report and "| int4-asym | 1 | cpu |" in report
    # The profiler split of each op's device time (CPU: the client's thunk timeline): XLA ops only for "xla".
    row = next(line for line in report.splitlines() if line.startswith("| int4-asym-g128 | 1 | xla |"))
    kernel, xla_side = (float(v) for v in row.split("|")[5].split("/"))
    assert kernel == 0.0 and xla_side > 0.0
    assert report.rstrip().endswith("device check: all steps passed")


def test_device_check_reports_a_failing_step(tmp_path):
    """A step that fails (here: a Python without jax) makes the whole check fail, and the report says so."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON="/bin/false", STEPS="sweep")
    r = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "SOME STEPS FAILED" in (tmp_path / "report.md").read_text()


def test_benchmark_splits_kernel_time_from_xla_time():
    """The CPU kernel is a custom call: the profiler split counts its time as kernel time, x's casts as XLA's."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.quantized_matmul", "--k", "256", "--n", "512", "--m", "2",
                        "--formats", "int4", "--x-dtype", "bfloat16", "--reps", "1", "--loops", "1", "--impls", "cpu",
                        "--markdown"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| int4-asym-g128 | 2 | cpu |"))
    kernel, xla_side = (float(v) for v in row.split("|")[5].split("/"))
    assert kernel > 0.0 and xla_side > 0.0


def test_benchmark_times_both_triton_decodes_when_asked():
    from benchmarks import quantized_matmul as bench
    both = bench.implementation_variants(["triton", "xla"], "both")
    assert [label for label, _ in both] == ["triton", "triton-tree", "xla"]
    assert both[0][1] is None and both[1][1].lookup is False and both[2][1] is None
    assert [label for label, _ in bench.implementation_variants(["triton"], "off")] == ["triton-tree"]
    assert bench.implementation_variants(["cpu", "xla"], "both") == [("cpu", None), ("xla", None)]


def test_device_check_tune_step_writes_a_table(tmp_path):
    """The optional "tune" step (not in the default steps) records measured tilings next to the report."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, STEPS="tune")
    env.pop("AFPQ_KERNELS_NATIVE", None)
    r = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    report = (tmp_path / "report.md").read_text()
    assert r.returncode == 0, report[-3000:]
    assert "## autotune xla_scan" in report and "recorded 1 tiling(s)" in report
    assert "|xla_scan|int4-asym-g128|" in (tmp_path / "tuned_configs.json").read_text()

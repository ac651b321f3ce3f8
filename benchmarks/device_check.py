"""One-shot accelerator check sized for a 15-minute device lease: the headline table first, then the rest.

Steps, in order (each a child process with its own time limit, its output streamed into one markdown report,
``$OUT/report.md``, as it arrives, so a lease that ends early still leaves every finished row):

1. ``platform``: versions and devices; on a device run it stops everything at once if JAX fell back to CPU.
2. ``headline``: `benchmarks.quantized_matmul --headline` (INT4-asym and NF4-asym, M = 1 and 16, K = N = 4096,
   g128; Triton with the table lookup and the select tree, or Mosaic TPU; "xla"; dense f32 / bf16), each kernel
   checked against "xla", timed by a device-side loop and by the profiler. About 3 minutes on a GPU.
3. ``tests``: the native kernel numerics tests of this backend's kernels only (``AFPQ_KERNELS_NATIVE=1``), each
   in its own process, 12 at a time (a CUDA fault poisons the process it happens in).
4. ``sweep``: formats x M x sym / asym with the time left.
5. ``tune``: `benchmarks.autotune` for the backend's kernel with the time left; it records each shape's tiling
   in ``$OUT/tuned_configs.json`` as soon as it is measured.

    python -m benchmarks.device_check              # on the device machine, from the repository root
    python -m benchmarks.device_check --dry-run    # CPU: the same steps on tiny shapes (the test suite runs it)
    python -m benchmarks.device_check --steps headline tests --budget-s 300
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("platform", "headline", "tests", "sweep", "tune")
# Each backend's Pallas kernels, the first the one the headline table and the autotune time.
BACKEND_KERNELS = {"gpu": ("triton", "mosaic_gpu"), "tpu": ("mosaic_tpu",)}
PLATFORM_CODE = """
import json, platform, jax, jaxlib
print(json.dumps(dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                      kinds=sorted({d.device_kind for d in jax.devices()}))))
"""


class Report:
    """The markdown report, appended and flushed line by line; echoed to stdout."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.failed: list[str] = []

    def write(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.file.write(line + "\n")
            print(line, flush=True)
        self.file.flush()

    def step(self, title: str, cmd: list[str], limit_s: float) -> tuple[int, str]:
        """Runs ``cmd``, streaming its output into the report; killed after ``limit_s``. (exit code, output)."""
        self.write(f"\n## {title}\n\n`{' '.join(cmd)}`\n")
        t0 = time.monotonic()
        out: list[str] = []
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            rc = 127
            self.write(f"cannot start: {e}")
        else:
            deadline = t0 + max(limit_s, 1.0)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                def pump():
                    for line in proc.stdout:
                        out.append(line)
                        self.write(line.rstrip("\n"))
                reader = pool.submit(pump)
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    self.write(f"(time limit {limit_s:.0f} s reached: stopped)")
                reader.result()
            rc = proc.returncode
        self.write(f"\n(exit {rc}, {time.monotonic() - t0:.0f} s)")
        if rc != 0:
            self.failed.append(title)
        return rc, "".join(out)


def native_test_ids(python: str, backend: str, dry_run: bool) -> list[str]:
    """The kernel numerics tests that run one of ``backend``'s kernels (on CPU, the dry run's single case)."""
    files = ["tests/kernels/test_quantized_matmul.py", "tests/kernels/test_quantized_matmul_a8.py"]
    if dry_run:
        expr = "test_formats_match_reference and triton-int4-a-g128"
    else:
        kernels = " or ".join(BACKEND_KERNELS.get(backend, ("cpu",)))
        expr = f"(match_reference or match_xla or vmap or differentiate) and ({kernels})"
    r = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files,
                        "-k", expr], capture_output=True, text=True)
    return [line.strip() for line in r.stdout.splitlines() if "::" in line]


def run_isolated(python: str, test_id: str, limit_s: float) -> tuple[str, str]:
    """(status, first error lines) of one test in its own process."""
    try:
        r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id], capture_output=True,
                           text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return "FAILED", "time limit reached"
    if r.returncode == 0:
        return ("passed" if " passed" in r.stdout else "skipped"), ""
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("E  ") or "Error" in ln]
    return "FAILED", "\n".join("        " + ln[:220] for ln in lines[:2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpret mode: the plumbing only")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/device")))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="device time for the whole check (default 600 s on a device, 240 s in the dry run); "
                         "the sweep and the autotune get what the earlier steps leave")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the steps run under")
    a = ap.parse_args(argv)
    start = time.monotonic()
    budget = a.budget_s or (240.0 if a.dry_run else 600.0)

    def left(reserve: float = 0.0) -> float:
        return budget - (time.monotonic() - start) - reserve

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if a.dry_run:
        env.update(JAX_PLATFORMS="cpu")
        bench = ["--k", "256", "--n", "256", "--reps", "2", "--loops", "1"]
        sweep = ["--m", "1", "--formats", "int4", "nf3", "--impls", "xla"]
        tune = ["--m", "1", "--k", "512", "--n", "256", "--formats", "int4", "--reps", "1"]
    else:
        env.update(AFPQ_KERNELS_NATIVE="1")
        bench = ["--reps", "20"]
        sweep = ["--m", "1", "16", "128", "1024", "--formats", "nf4", "fp4_e2m1", "nf3", "int4"]
        tune = ["--m", "1", "16", "128", "--formats", "int4", "nf4", "fp4_e2m1", "nf3"]
    os.environ.update(env)
    py = a.python
    report = Report(a.out / "report.md")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report.write(f"# afpq-jax device check ({time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, commit "
                 f"{commit or '?'}{', dry run on CPU' if a.dry_run else ''}; budget {budget:.0f} s)")

    backend = "cpu"
    if "platform" in a.steps or not a.dry_run:  # a device run always checks where it runs
        rc, out = report.step("platform: versions and devices", [py, "-c", PLATFORM_CODE], 120)
        info = next((json.loads(ln) for ln in out.splitlines() if ln.startswith("{")), None) if rc == 0 else None
        if info is None:
            report.write("\ndevice check: STOPPED (JAX did not start)")
            return 1
        backend = info["backend"]
        if shutil.which("nvidia-smi"):
            report.step("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                       "--format=csv"], 30)
        if backend == "cpu" and not a.dry_run:
            report.write("\ndevice check: STOPPED: JAX runs on CPU here (no GPU/TPU found, or its plugin failed to "
                         "load: see the devices above); fix the install, or pass --dry-run for the CPU plumbing")
            return 2
    kernels = BACKEND_KERNELS.get(backend, ())

    if "headline" in a.steps:
        report.step("headline: INT4-asym / NF4-asym decode, kernel vs xla vs dense",
                    [py, "-m", "benchmarks.quantized_matmul", "--headline", "--markdown", *bench, "--impls",
                     *(kernels[:1] or ("cpu",)), "xla"], min(max(left(), 30), 360))
    if "tests" in a.steps:
        report.write("\n## native kernel tests of this backend (each in its own process)\n")
        t0 = time.monotonic()
        ids = native_test_ids(py, backend, a.dry_run)
        limit = max(min(180.0, left(reserve=120)), 30.0)
        counts = {"passed": 0, "skipped": 0, "FAILED": 0}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = {pool.submit(run_isolated, py, t, limit): t for t in ids}
            for fut in concurrent.futures.as_completed(futures):
                status, detail = fut.result()
                counts[status] += 1
                report.write(f"{status:7} {futures[fut]}" + (f"\n{detail}" if detail else ""))
        report.write(f"\n{counts['passed']} passed, {counts['skipped']} skipped, {counts['FAILED']} failed of "
                     f"{len(ids)} ({time.monotonic() - t0:.0f} s)")
        if counts["FAILED"] or not ids:
            report.failed.append("native kernel tests")
    if "sweep" in a.steps:
        budget_s = left(reserve=90 if "tune" in a.steps else 30)
        if budget_s > 20:
            report.step("sweep: formats x M, asym and sym, g128",
                        [py, "-m", "benchmarks.quantized_matmul", "--markdown", *bench, *sweep, "--schemes", "asym",
                         "sym", "--no-profile", "--budget-s", f"{budget_s - 20:.0f}"], budget_s + 40)
        else:
            report.write("\n## sweep\n\nskipped: no time left")
    if "tune" in a.steps:
        impl = kernels[0] if kernels else "xla_scan"
        budget_s = left()
        if budget_s > 20:
            report.step(f"autotune {impl}", [py, "-m", "benchmarks.autotune", "--impl", impl, *tune, "--out",
                                             str(a.out / "tuned_configs.json"), "--budget-s", f"{budget_s - 20:.0f}"],
                        budget_s + 40)
        else:
            report.write(f"\n## autotune {impl}\n\nskipped: no time left")
    report.write("\ndevice check: " + ("all steps passed" if not report.failed else
                                       f"SOME STEPS FAILED ({', '.join(report.failed)})"))
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())

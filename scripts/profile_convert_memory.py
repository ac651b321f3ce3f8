"""Peak resident memory per conversion phase: runs `python -m afpq_jax.convert` in-process with a sampler thread
reading VmRSS every 20 ms (5 ms with ``--per-block``), and prints the peak seen while each phase of the
block-by-block driver ran.

    python scripts/profile_convert_memory.py -- --method gptq --format nf3 --calib-samples 128 \
        --calib-seqlen 512 --out /tmp/q --overwrite --no-progress

For the headline figure use `/usr/bin/time -v python -m afpq_jax.convert ...` (the whole process, no sampler);
this script says *where* the peak happens. ``--per-block`` prints the peaks of each block's phases as the block
ends (and the resident size after its clean-up), which shows whether the peak creeps from block to block:

    python scripts/profile_convert_memory.py --per-block -- --method awq --format nf3 ...

glibc's own knobs apply, e.g. ``MALLOC_MMAP_THRESHOLD_=1048576 python scripts/profile_convert_memory.py ...``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import defaultdict


def rss_mb() -> tuple[float, float, float]:
    """(resident, anonymous, file-backed) MiB; file-backed is mostly jaxlib's shared library code."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1]) / 1024
    return values.get("VmRSS", 0.0), values.get("RssAnon", 0.0), values.get("RssFile", 0.0)


def main() -> int:
    argv = sys.argv[1:]
    per_block = bool(argv) and argv[0] == "--per-block"
    argv = argv[per_block:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    from afpq_jax import convert
    from afpq_jax._src.algorithms import blockwise

    phase = ["start"]
    peaks: dict[str, tuple[float, float, float]] = defaultdict(lambda: (0.0, 0.0, 0.0))
    stop = threading.Event()

    block_peaks: dict[str, float] = defaultdict(float)  # this block's, for --per-block

    def sample() -> None:
        while not stop.is_set():
            now = rss_mb()
            peaks[phase[0]] = max(peaks[phase[0]], now)  # the sample with the highest VmRSS
            block_peaks[phase[0]] = max(block_peaks[phase[0]], now[0])
            time.sleep(0.005 if per_block else 0.02)

    original = blockwise._Timer.__call__

    @contextlib.contextmanager
    def tracked(self, key):
        before, phase[0] = phase[0], key
        try:
            with original(self, key):
                yield
        finally:
            phase[0] = before

    blockwise._Timer.__call__ = tracked
    if per_block:
        release = blockwise.release_freed_memory

        def report_block() -> None:  # called once per block, after the block's clean-up
            release()
            print(" ".join(f"{k}={v:.0f}" for k, v in block_peaks.items()), f"| after={rss_mb()[0]:.0f} MiB",
                  flush=True)
            block_peaks.clear()

        blockwise.release_freed_memory = report_block
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = convert.main(argv)
    finally:
        stop.set()
        thread.join()
    print("\npeak RSS by phase (MiB):         total     anon     file")
    for key, (total, anon, file) in sorted(peaks.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:28s} {total:8.0f} {anon:8.0f} {file:8.0f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

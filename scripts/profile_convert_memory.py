"""Peak resident memory per conversion phase: runs `afpq_jax.quantize_pretrained` + `afpq_jax.save` on
SmolLM2-135M-Instruct (what `python -m afpq_jax.convert` does) with a sampler thread reading VmRSS every 20 ms
(5 ms with ``--per-block``), and prints the peak seen while each phase of the block-by-block driver ran.

    python scripts/profile_convert_memory.py --method gptq --format nf3 --calib-samples 128 --calib-seqlen 512

For the headline figure use `/usr/bin/time -v python -m afpq_jax.convert ...` (the whole process, no sampler);
this script says *where* the peak happens ("start" = outside the driver's phases: loading, tokenizing, saving).
``--per-block`` prints the peaks of each block's phases as the block ends (and the resident size after its
clean-up), which shows whether the peak creeps from block to block:

    python scripts/profile_convert_memory.py --per-block --method awq --format nf3 --calib-seqlen 512

glibc's own knobs apply, e.g. ``MALLOC_MMAP_THRESHOLD_=1048576 python scripts/profile_convert_memory.py ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.calibration import PhaseTimer
from afpq_jax.memory import limit_malloc_arenas


def rss_mb() -> tuple[float, float, float]:
    """(resident, anonymous, file-backed) MiB; file-backed is mostly jaxlib's shared library code."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1]) / 1024
    return values.get("VmRSS", 0.0), values.get("RssAnon", 0.0), values.get("RssFile", 0.0)


class TrackingTimer(PhaseTimer):
    """A `PhaseTimer` that tells the sampler which phase is running and, with ``per_block``, prints each block's
    phase peaks once the driver has released the block's memory."""

    def __init__(self, per_block: bool):
        super().__init__()
        self.per_block = per_block
        self.phase = "start"
        self.block_peaks: dict[str, float] = defaultdict(float)  # this block's, for --per-block

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase  # phases nest (a method's own phases run inside the driver's)
        try:
            with super().__call__(phase):
                yield
        finally:
            self.phase = before

    def block_done(self, index: int) -> None:
        if self.per_block:
            peaks = dict(self.block_peaks)  # a copy: the sampler thread may add a phase while this prints
            print(f"block {index}:", " ".join(f"{k}={v:.0f}" for k, v in peaks.items()),
                  f"| after={rss_mb()[0]:.0f} MiB", flush=True)
        self.block_peaks.clear()


def _group_size(text: str) -> int | None:
    return None if text.lower() in ("none", "channel", "per-channel", "0") else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", default="rtn", choices=aq.calibration.available_methods(), help="as the CLI's --method")
    ap.add_argument("--format", default="nf3", help="code book, as the CLI's --format")
    ap.add_argument("--group-size", type=_group_size, default=128, help="'none' = one group per output channel")
    ap.add_argument("--sym", action="store_true", help="symmetric instead of asymmetric (AFPQ) scales")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    ap.add_argument("--calib-batch-size", type=int, default=2, help="calibration windows per forward pass")
    ap.add_argument("--per-block", action="store_true", help="print each block's phase peaks as it ends")
    ap.add_argument("--out", default=None,
                    help="checkpoint directory, overwritten if it exists (None: a temporary one, removed after)")
    args = ap.parse_args()
    limit_malloc_arenas()  # as the CLI does before any work: the figures should be the CLI's
    model_path = str(assets.smollm2_hf_dir())
    scheme = aq.QuantScheme.create(args.format, group_size=args.group_size, asym=not args.sym)
    calibration = aq.Calibration(text=assets.wiki_text()[0], samples=args.calib_samples, seqlen=args.calib_seqlen,
                                 batch_size=args.calib_batch_size)

    timer = TrackingTimer(args.per_block)
    peaks: dict[str, tuple[float, float, float]] = defaultdict(lambda: (0.0, 0.0, 0.0))
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now, phase = rss_mb(), timer.phase
            peaks[phase] = max(peaks[phase], now)  # the sample with the highest VmRSS
            timer.block_peaks[phase] = max(timer.block_peaks[phase], now[0])
            time.sleep(0.005 if args.per_block else 0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with contextlib.ExitStack() as cleanup:
            out = args.out or Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "checkpoint"
            model = aq.quantize_pretrained(model_path, aq.default_rules(scheme), method=args.method,
                                           calibration=calibration, timer=timer, progress=False)
            aq.save(model, out, overwrite=True)  # saving is part of the run: its peak lands in "start"
    finally:
        stop.set()
        thread.join()
    print(f"\n{args.method} {scheme} -> {args.out or '(temporary directory, removed)'}; seconds by phase:",
          timer.rounded())
    print("\npeak RSS by phase (MiB):         total     anon     file")
    for key, (total, anon, file) in sorted(peaks.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:28s} {total:8.0f} {anon:8.0f} {file:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak extra resident memory and time of one calibration pass over one SmolLM2 block, per batch size: the
statistics forward (sum |x| for AWQ, X^T X for GPTQ) over 128 sequences and AWQ's capture of down_proj's input
over 16 search sequences. Inputs are random (memory and time do not depend on the values).

    python scripts/block_pass_memory.py [--seqlen 512] [--batches 1,2,4]

Each pass runs twice (the first includes compilation); the second is the steady-state figure.
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax import assets
from afpq_jax.calibration import ABS_SUM, XTX, block_linears, checkpoint_weights, input_statistics, layer_input
from afpq_jax.memory import release_freed_memory


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batches", default="1,2,4")
    args = ap.parse_args()
    weights = checkpoint_weights(assets.smollm2_hf_dir())
    cfg = weights.cfg
    block = weights.block(0, cfg, jnp.float32)
    layers = tuple(block_linears(block))  # every linear: the passes tap all of the block's inputs
    x = np.random.default_rng(0).standard_normal((128, args.seqlen, cfg.hidden_size)).astype(np.float32)
    batches = [int(b) for b in args.batches.split(",")]
    positions = jnp.broadcast_to(jnp.arange(args.seqlen, dtype=jnp.int32), (max(batches), args.seqlen))

    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    passes = {
        "stats sum|x|": lambda b: input_statistics(block, (ABS_SUM,), layers, x, positions, b),
        "stats X^T X": lambda b: input_statistics(block, (XTX,), layers, x, positions, b),
        "down_proj input (16 seq)": lambda b: layer_input(block, x[:16], positions, b, "mlp.down_proj"),
    }
    print(f"SmolLM2 block 0, seqlen {args.seqlen}: extra peak RSS (MiB) and seconds, second run of each")
    for name, run in passes.items():
        for b in batches:
            for _ in range(2):
                release_freed_memory()
                time.sleep(0.05)
                base = peak[0] = rss_mib()
                t0 = time.perf_counter()
                out = jax.block_until_ready(run(b))
                seconds = time.perf_counter() - t0
                del out
            print(f"  {name:26s} batch {b}: +{peak[0] - base:5.0f} MiB  {seconds:5.1f} s", flush=True)
    stop.set()


if __name__ == "__main__":
    main()

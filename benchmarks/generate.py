"""Time greedy generation from a checkpoint (public API only): one warm-up call (compilation included), then one
timed call of the same length. Prints one JSON line.

    python -m benchmarks.generate out/smollm2-135m-instruct-nf3-asym-g128 --new-tokens 64

Used for the CPU-path figures in BUILD_NOTES ("CPU path": before / after the C++ kernel).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import afpq_jax as aq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="converted checkpoint, HF directory or .gguf file")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-ids", type=int, nargs="+", default=[1, 504, 3458, 282, 4649, 314])
    a = ap.parse_args()
    model = aq.load(a.model)
    prompt = np.asarray([a.prompt_ids], np.int32)
    t0 = time.perf_counter()
    aq.generate(model, prompt, max_new_tokens=a.new_tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    aq.generate(model, prompt, max_new_tokens=a.new_tokens)
    timed = time.perf_counter() - t0
    print(json.dumps({"model": a.model, "new_tokens": a.new_tokens, "first_call_s": round(first, 2),
                      "timed_call_s": round(timed, 2), "ms_per_token": round(timed / a.new_tokens * 1e3, 1)}))


if __name__ == "__main__":
    main()

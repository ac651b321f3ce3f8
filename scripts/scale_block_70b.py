"""One decoder block with LLaMA-2-70B's shapes, converted on 1, 2 and 4 simulated CPU devices (issue #15).

Writes a one-layer LLaMA checkpoint (hidden 8192, 64 heads, 8 KV heads, intermediate 28672; random bf16 weights,
std 0.02, as two safetensors shards with an index, the way the Hub ships 70B) and converts it with
`afpq_jax.quantize_pretrained` in a fresh process per configuration (the device count is fixed at JAX's start):
data-parallel calibration over a ``data`` mesh of D devices. Each run prints one JSON line: the driver's phase
times (``block`` = the whole block step), the process's peak RSS (VmHWM) and wall time; the table at the end is
what BUILD_NOTES quotes.

    python scripts/scale_block_70b.py --dir /tmp/llama70b_block --devices 1 2 4 --methods rtn gptq awq
    python scripts/scale_block_70b.py --dir /tmp/llama70b_block --devices 1 --methods gptq --max-memory 4G

Calibration is random tokens (``--samples`` x ``--seqlen``, default 8 x 512 = 4096 tokens); per-block time of
calibrated methods grows linearly in tokens for the forward passes and not at all for GPTQ's solve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA2_70B = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672}


def write_checkpoint(d: Path, vocab: int, seed: int = 0) -> None:
    """config.json + two safetensors shards + model.safetensors.index.json (skipped when present)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if (d / "model.safetensors.index.json").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    h, inter, heads, kv = (LLAMA2_70B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                    "num_key_value_heads"))
    hd = h // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
           "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16", **LLAMA2_70B}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    rng = np.random.default_rng(seed)
    p = "model.layers.0."
    shapes = {  # HF (out, in) orientation
        "model.embed_tokens.weight": (vocab, h),
        p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
        p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
    }
    norms = {p + "input_layernorm.weight": h, p + "post_attention_layernorm.weight": h, "model.norm.weight": h}
    names = list(shapes)
    shards = {"model-00001-of-00002.safetensors": names[:5] + list(norms),
              "model-00002-of-00002.safetensors": names[5:]}
    index = {"metadata": {}, "weight_map": {}}
    for fname, keys in shards.items():
        tensors = {}
        for k in keys:
            if k in norms:
                tensors[k] = np.ones(norms[k], ml_dtypes.bfloat16)
            else:
                tensors[k] = (rng.standard_normal(shapes[k], np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            index["weight_map"][k] = fname
        save_file(tensors, str(d / fname))
        del tensors
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(a) -> None:
    """Child: one conversion (JAX already sees ``--devices`` CPU devices through XLA_FLAGS)."""
    import jax

    import afpq_jax as aq
    from afpq_jax.calibration import PhaseTimer

    t0 = time.perf_counter()
    mesh = jax.make_mesh((a.devices,), ("data",)) if a.devices > 1 else None
    calib = aq.Calibration(random=True, samples=a.samples, seqlen=a.seqlen, batch_size=a.batch_size,
                           search_samples=min(a.samples, 4), search_batch_size=a.batch_size)
    timer = PhaseTimer()
    model = aq.quantize_pretrained(a.dir, aq.QuantScheme(format=a.format, group_size=128, asym=True),
                                   method=a.method[0], calibration=calib, progress=False, timer=timer, mesh=mesh,
                                   max_memory=a.max_memory)
    jax.block_until_ready(jax.tree.leaves(model))
    print(json.dumps({"method": a.method[0], "devices": a.devices, "format": a.format,
                      "tokens": a.samples * a.seqlen, "max_memory": a.max_memory,
                      "wall_s": round(time.perf_counter() - t0, 1), "phases_s": timer.rounded(),
                      "peak_rss_mb": round(peak_rss_mb())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama70b_block"))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--methods", "--method", dest="method", nargs="+", default=["rtn", "gptq", "awq"])
    ap.add_argument("--format", default="int4")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward (split over data)")
    ap.add_argument("--max-memory", default=None, help="e.g. 4G (the conversion's --max-memory)")
    ap.add_argument("--out", type=Path, default=Path("results/scale_70b_block.jsonl"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.devices = a.devices[0]
        a.max_memory = int(a.max_memory) if a.max_memory is not None else None
        run_one(a)
        return

    write_checkpoint(a.dir, a.vocab)
    budget = None
    if a.max_memory is not None:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        s = a.max_memory.upper().rstrip("B")
        budget = int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for method in a.method:
        for n in a.devices:
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n} "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=3600")  # a loaded host is slow
            cmd = [sys.executable, __file__, "--child", "--dir", str(a.dir), "--devices", str(n), "--method", method,
                   "--format", a.format, "--samples", str(a.samples), "--seqlen", str(a.seqlen),
                   "--batch-size", str(a.batch_size)] + (["--max-memory", str(budget)] if budget else [])
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode != 0 or not lines:
                rec = {"method": method, "devices": n, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300],
                       "returncode": r.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
            else:
                rec = json.loads(lines[-1])
            rec["commit"] = commit
            print(json.dumps(rec), flush=True)
            with a.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark (CPU): peak RSS of a calibrated conversion with and without a memory budget (`max_memory`).

GPTQ INT4 g64 on a random one-layer LLaMA (hidden 64) with 3072 x 256 random calibration tokens: 192 MiB of float32
activations. Each run is a fresh process (its VmHWM is its own peak); the budgeted run keeps the activations in a
file under ``--spill-dir`` (`spill.py`), so its peak should drop by most of the 192 MiB, and both runs must write
the same quantized model (equal checksums).

    python -m benchmarks.spill_memory [--budget-mib 64] [--repeats 2] [--out results/spill_memory.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.experiment import Results, commit

RUN = """
import json, resource, sys
import numpy as np
from flax import nnx
import afpq_jax as aq
src, budget, spill = sys.argv[1], sys.argv[2], sys.argv[3]
cal = aq.Calibration(random=True, samples=3072, seqlen=256, batch_size=32)
m = aq.quantize_pretrained(src, aq.QuantScheme.create("int4", group_size=64), method="gptq", calibration=cal,
                           progress=False, max_memory=None if budget == "none" else int(budget), spill_dir=spill)
digest = float(sum(np.asarray(v.get_value(), np.float64).sum() for _, v in nnx.to_flat_state(nnx.state(m))))
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak_kb / 1024, "digest": digest}))
"""


def write_model(directory: Path, hidden: int = 64, layers: int = 1, vocab: int = 512) -> Path:
    """A random Hugging Face LLaMA directory (safetensors) of the given size (head_dim 64, MLP 2 x hidden)."""
    from safetensors.numpy import save_file
    directory.mkdir(parents=True)
    inter, heads = 2 * hidden, hidden // 64
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "vocab_size": vocab, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                        p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                        **{p + f"self_attn.{n}_proj.weight": w(hidden, hidden) for n in "qkvo"},
                        p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                        p + "mlp.down_proj.weight": w(hidden, inter)})
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results/spill_memory.jsonl")
    args = ap.parse_args()
    results = Results(args.out, key=lambda r: None)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_model(Path(tmp) / "model")
        spill = Path(tmp) / "spill"
        spill.mkdir()
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        for _ in range(args.repeats):
            runs = {}
            for budget in ("none", str(args.budget_mib * 2**20)):
                r = subprocess.run([sys.executable, "-c", RUN, str(src), budget, str(spill)], env=env,
                                   capture_output=True, text=True, check=True)
                runs[budget] = json.loads(r.stdout.strip().splitlines()[-1])
            full, capped = runs["none"], runs[str(args.budget_mib * 2**20)]
            results.add({"commit": commit(), "activations_mib": 192, "budget_mib": args.budget_mib,
                         "peak_mb_in_ram": round(full["peak_mb"], 1), "peak_mb_budget": round(capped["peak_mb"], 1),
                         "same_model": capped["digest"] == full["digest"],
                         "spill_left_behind": sorted(p.name for p in spill.iterdir())})


if __name__ == "__main__":
    main()

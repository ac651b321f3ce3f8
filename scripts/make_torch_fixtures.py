#!/usr/bin/env python
"""Generate small PyTorch-transformers reference fixtures under tests/fixtures/.

Each fixture is a tiny RANDOM model built with transformers' PyTorch classes
(LlamaForCausalLM, BloomForCausalLM, Gemma3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), float32, eval mode, fixed
torch.manual_seed.  For every fixture a directory ``tests/fixtures/<name>/`` is
written with

* ``config.json``, ``generation_config.json`` and ``model.safetensors`` (or
  ``model.safetensors.index.json`` + ``model-0000X-of-0000N.safetensors``
  shards) exactly as ``model.save_pretrained(dir, safe_serialization=True)``
  writes them;
* ``reference.npz`` with ``input_ids`` (int32 [2, seq]) and ``logits``
  (float32 [2, seq, vocab]) from one forward pass with no attention mask
  (plain causal attention, positions 0..seq-1).

``llama_gqa`` additionally gets ``generate.npz`` with ``prompt`` (int32 [1, 5])
and ``generated`` (int32 [1, 8]): the tokens of
``model.generate(prompt, do_sample=False, max_new_tokens=8)`` after the prompt.

Besides the Linear/Embedding weights (normal, std = initializer_range), the
RMSNorm / LayerNorm weights are perturbed away from 1 and every bias (BLOOM's
Linear and LayerNorm biases; HF initialises them to 0) away from 0, so that a
loader that silently drops norm weights or biases fails the test.

Note on the config format: transformers 5 writes RoPE settings as a single
``rope_parameters`` dict in config.json (no top-level ``rope_theta`` or
``rope_scaling``).  E.g. ``llama3_rope/config.json`` contains::

    "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0,
                        "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 32,
                        "rope_theta": 500000, "rope_type": "llama3"}

and the plain fixtures contain ``"rope_parameters": {"rope_theta": ...,
"rope_type": "default"}``.  Older (transformers 4.x) checkpoints instead use
top-level ``"rope_theta"`` and ``"rope_scaling": {..., "rope_type": "llama3"}``.

How to run (torch must NOT go into the project's own .venv)::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/torchvenv/bin/python scripts/make_torch_fixtures.py

(run from the repository root; ``--out DIR`` overrides tests/fixtures).  The
fixtures were produced with torch 2.13.0+cpu and transformers 5.23.0.  Output
is deterministic: re-running yields byte-identical files (the npz archives are
written with fixed zip timestamps, torch runs single-threaded).
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (BloomConfig, BloomForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 160
LAYERS = 2
INIT_RANGE = 0.15


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def perturb_norms(model: torch.nn.Module, seed: int, norm_center: float = 1.0) -> None:
    """Move norm weights away from their init (``norm_center``: 1, Gemma's (1 + w) norms 0) and all biases (HF
    inits them to 0) away from 0."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(norm_center + 0.2 * torch.randn(p.shape, generator=gen))


def llama_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-6,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build(model_cls, config, seed: int, norm_center: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32)
    perturb_norms(model, seed, norm_center)
    model.eval()
    return model


def random_ids(seed: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2000)
    return torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.long)


def write_fixture(out: Path, name: str, model, seed: int, seq: int, **save_kw) -> Path:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():  # remove stale shards etc. from earlier runs
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".npz")):
            f.unlink()
    model.save_pretrained(d, safe_serialization=True, **save_kw)
    ids = random_ids(seed, 2, seq, model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_npz_deterministic(
        d / "reference.npz",
        input_ids=ids.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
    )
    print(f"{name}: logits {tuple(logits.shape)} std={logits.std().item():.3f} "
          f"absmax={logits.abs().max().item():.3f}")
    return d


def make_generate_reference(d: Path, model, seed: int, new_tokens: int = 8) -> None:
    prompt = random_ids(seed + 7, 1, 5, model.config.vocab_size)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    gen = out[:, prompt.shape[1]:]
    assert gen.shape == (1, new_tokens), gen.shape
    # Cross-check greedy decoding with repeated full forward passes.
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq[:, 5:], gen), (seq, gen)
    eos = model.config.eos_token_id
    assert eos not in gen.tolist()[0], "eos generated; pick another seed"
    save_npz_deterministic(
        d / "generate.npz",
        prompt=prompt.numpy().astype(np.int32),
        generated=gen.numpy().astype(np.int32),
    )
    print(f"  generate: prompt={prompt.tolist()[0]} -> {gen.tolist()[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    # 1. llama_gqa: GQA (4 q heads / 2 kv heads), untied, theta 1e4.
    seed = 0
    m = build(LlamaForCausalLM, llama_config(), seed)
    d = write_fixture(out, "llama_gqa", m, seed, seq=24)
    make_generate_reference(d, m, seed)

    # 2. llama_tied_theta: MHA, tied embeddings, rope_theta 5e5.
    seed = 1
    cfg = llama_config(
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    m = build(LlamaForCausalLM, cfg, seed)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    write_fixture(out, "llama_tied_theta", m, seed, seq=20)

    # 3. llama3_rope: llama3 RoPE scaling.  2 q heads / 1 kv head so that
    #    head_dim = 32 and the inverse frequencies fall in all three llama3
    #    bands (unscaled high-freq, smoothly interpolated, scaled low-freq).
    seed = 2
    cfg = llama_config(
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    m = build(LlamaForCausalLM, cfg, seed)
    write_fixture(out, "llama3_rope", m, seed, seq=64)
    inv = 1.0 / (500000.0 ** (np.arange(0, 32, 2) / 32))
    wl = 2 * np.pi / inv
    print(f"  llama3 bands: high(unscaled)={int((wl < 8).sum())} "
          f"smooth={int(((wl >= 8) & (wl <= 32)).sum())} low(scaled)={int((wl > 32).sum())}")

    # 4. llama_sharded: llama_gqa architecture, other seed, sharded safetensors.
    seed = 3
    m = build(LlamaForCausalLM, llama_config(), seed)
    d = write_fixture(out, "llama_sharded", m, seed, seq=16, max_shard_size="150KB")
    assert (d / "model.safetensors.index.json").exists()

    # 5. bloom: ALiBi, LayerNorm with bias, fused QKV, tied embeddings.
    seed = 4
    cfg = BloomConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        initializer_range=INIT_RANGE,
        layer_norm_epsilon=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = build(BloomForCausalLM, cfg, seed)
    write_fixture(out, "bloom", m, seed, seq=24)

    # 6. gemma3_text: (1 + w) norms, four per block, q/k norms, GeGLU, scaled embeddings, GQA, head_dim 32 (not
    #    hidden / heads), query_pre_attn_scalar 24, sliding window 6 on layers 0 and 2 with RoPE base 1e4, the
    #    full layer's RoPE linear-scaled (factor 2, base 1e6), final logit soft-capping 4. seq 24 (four windows);
    #    generate.npz runs 12 new tokens past a 5-token prompt, beyond the window. Untied (Gemma ties): a tiny
    #    random model with tied, scaled embeddings only repeats its last input token, a useless generation check.
    seed = 6
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        initializer_range=INIT_RANGE, rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=4.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = build(Gemma3ForCausalLM, cfg, seed, norm_center=0.0)
    d = write_fixture(out, "gemma3", m, seed, seq=24)
    make_generate_reference(d, m, seed, new_tokens=12)

    # 7. qwen2: q/k/v biases, o_proj without, GQA, untied.
    seed = 7
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=INIT_RANGE,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    m = build(Qwen2ForCausalLM, cfg, seed)
    write_fixture(out, "qwen2", m, seed, seq=24)

    # 8. qwen3: per-head q/k RMSNorm, head_dim 32 (not hidden / heads), tied embeddings, the sliding window (8) on
    #    layer 1 (use_sliding_window, max_window_layers 1).
    seed = 8
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        initializer_range=INIT_RANGE, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=1, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    m = build(Qwen3ForCausalLM, cfg, seed)
    assert m.config.layer_types == ["full_attention", "sliding_attention"], m.config.layer_types
    write_fixture(out, "qwen3", m, seed, seq=24)

    print("files:")
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            print(f"  {f.relative_to(out)}  {os.path.getsize(f)} bytes")


if __name__ == "__main__":
    main()

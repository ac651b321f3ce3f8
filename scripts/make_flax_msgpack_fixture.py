#!/usr/bin/env python
"""Generate tests/fixtures/llama_flax/: a Hugging Face *Flax-format* checkpoint.

Writes ``config.json`` + ``flax_model.msgpack`` exactly as transformers 4.x
``FlaxLlamaForCausalLM.save_pretrained`` saved them, holding the SAME weights
as ``tests/fixtures/llama_gqa`` (converted with ``from_pt=True`` from that
directory's model.safetensors).  A test can therefore load the msgpack and
compare its logits with ``tests/fixtures/llama_gqa/reference.npz``.

Flax support was removed from transformers 5, so this needs a SEPARATE venv
with transformers 4.57 and the last jax/flax versions it accepts
(flax<=0.7.0, jax/jaxlib<=0.4.13, hence numpy<2), plus torch for from_pt::

    python3 -m venv /work/flaxvenv
    /work/flaxvenv/bin/pip install torch==2.13.0 "transformers==4.57.*" safetensors \\
        "jax==0.4.13" "jaxlib==0.4.13" "flax==0.7.0" "numpy<2" "ml_dtypes==0.2.0" \\
        "scipy<1.13" "orbax-checkpoint<0.5" "tensorstore<0.1.50"
    /work/flaxvenv/bin/python scripts/make_flax_msgpack_fixture.py

Run it from the repository root AFTER scripts/make_torch_fixtures.py (it reads
tests/fixtures/llama_gqa).  The fixture was produced with transformers 4.57.6,
flax 0.7.0, jax 0.4.13, torch 2.13.0+cpu.

The config.json is written by transformers 4.57's LlamaConfig, i.e. in the 4.x
format (top-level ``rope_theta`` = 10000.0 and ``rope_scaling`` = null, no
``rope_parameters``).  transformers 4.x FlaxLlama always uses theta 10000 and
head_dim = hidden_size // num_attention_heads, which matches llama_gqa.

The msgpack is a flax.serialization state dict (nested dicts, no "params"
wrapper) of the form::

    model/embed_tokens/embedding                      [vocab, hidden]
    model/layers/<i>/input_layernorm/weight           [hidden]
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel  [in, out]  (= torch weight.T)
    model/layers/<i>/post_attention_layernorm/weight  [hidden]
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel   [in, out]
    model/norm/weight                                 [hidden]
    lm_head/kernel                                    [hidden, vocab]
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict
from transformers import FlaxLlamaForCausalLM, LlamaConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SRC = FIXTURES / "llama_gqa"
DST = FIXTURES / "llama_flax"


def main() -> None:
    print(f"transformers {transformers.__version__}, jax {jax.__version__}")
    src_cfg = json.loads((SRC / "config.json").read_text())
    rope = src_cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", src_cfg.get("rope_theta", 10000.0))
    assert rope.get("rope_type", "default") == "default" and float(theta) == 10000.0, rope

    # Re-create the config with transformers 4.x so config.json is 4.x-style.
    config = LlamaConfig(
        vocab_size=src_cfg["vocab_size"],
        hidden_size=src_cfg["hidden_size"],
        intermediate_size=src_cfg["intermediate_size"],
        num_hidden_layers=src_cfg["num_hidden_layers"],
        num_attention_heads=src_cfg["num_attention_heads"],
        num_key_value_heads=src_cfg["num_key_value_heads"],
        hidden_act=src_cfg["hidden_act"],
        max_position_embeddings=src_cfg["max_position_embeddings"],
        initializer_range=src_cfg["initializer_range"],
        rms_norm_eps=src_cfg["rms_norm_eps"],
        bos_token_id=src_cfg["bos_token_id"],
        eos_token_id=src_cfg["eos_token_id"],
        tie_word_embeddings=src_cfg["tie_word_embeddings"],
        rope_theta=float(theta),
        attention_bias=src_cfg["attention_bias"],
        mlp_bias=src_cfg["mlp_bias"],
        architectures=["FlaxLlamaForCausalLM"],
    )
    model = FlaxLlamaForCausalLM.from_pretrained(SRC, config=config, from_pt=True, dtype=jnp.float32)

    ref = np.load(SRC / "reference.npz")
    logits = np.asarray(model(jnp.asarray(ref["input_ids"])).logits)
    err = float(np.abs(logits - ref["logits"]).max())
    print(f"max |flax - torch reference| = {err:.3e}")
    assert err < 1e-3, err

    DST.mkdir(parents=True, exist_ok=True)
    for f in DST.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(DST)

    # Re-load from the msgpack alone (no torch) and re-check.
    model2 = FlaxLlamaForCausalLM.from_pretrained(DST, dtype=jnp.float32)
    logits2 = np.asarray(model2(jnp.asarray(ref["input_ids"])).logits)
    err2 = float(np.abs(logits2 - ref["logits"]).max())
    print(f"reloaded msgpack: max |flax - torch reference| = {err2:.3e}")
    assert err2 < 1e-3, err2

    tree = msgpack_restore((DST / "flax_model.msgpack").read_bytes())
    print("flax_model.msgpack key tree:")
    for path, arr in sorted(flatten_dict(tree).items()):
        print(f"  {'/'.join(path)}  {tuple(arr.shape)} {arr.dtype}")
    for f in sorted(DST.iterdir()):
        print(f"{f.relative_to(FIXTURES)}  {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()

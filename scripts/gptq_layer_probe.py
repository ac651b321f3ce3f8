"""GPTQ vs RTN layer-output MSE on one real SmolLM2 block, on held-out tokens.

    python scripts/gptq_layer_probe.py [--block 10] [--formats int4,nf4,nf3]

Captures the block's linear inputs for 32 random 256-token windows of the calibration text, builds each layer's
Hessian from the first half of the tokens and reports GPTQ's output MSE over RTN's on both halves (g128).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.algorithms import accumulate_hessian, gptq_quantize, output_mse
from afpq_jax.calibration import block_linears, record_inputs, sample_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--formats", default="int4,nf4,nf3")
    args = ap.parse_args()
    path = assets.smollm2_hf_dir()
    model, tok = aq.load(path), aq.load_tokenizer(path)
    calib_text, _ = assets.wiki_text()
    ids = sample_windows(tok(calib_text[:800_000], add_special_tokens=False)["input_ids"], 32, 256)
    x = model.embed_inputs(jnp.asarray(ids))
    pos = jnp.broadcast_to(jnp.arange(256), ids.shape)
    for layer in model.layers[: args.block]:
        x, _ = layer(x, pos)
    block = model.layers[args.block]
    with record_inputs() as taps:
        block(x, pos)
    names = {id(m): n for n, m in block_linears(block).items()}
    inputs = {names[id(m)]: np.asarray(i).reshape(-1, i.shape[-1]) for m, i in taps}
    print("| format | layer | GPTQ/RTN MSE, Hessian tokens | GPTQ/RTN MSE, held-out tokens |\n|---|---|---|---|")
    for fmt in args.formats.split(","):
        for name in ["attn.q_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"]:
            w = block_linears(block)[name].kernel.get_value()
            fit, held = np.array_split(inputs[name], 2)
            h, _ = accumulate_hessian(None, jnp.asarray(fit), 0)
            gptq = aq.dequantize(gptq_quantize(w, h, fmt, group_size=128))
            rtn = aq.fake_quant(w, fmt, group_size=128)
            print(f"| {fmt} | {name} | {output_mse(w, gptq, fit) / output_mse(w, rtn, fit):.3f} | "
                  f"{output_mse(w, gptq, held) / output_mse(w, rtn, held):.3f} |", flush=True)


if __name__ == "__main__":
    main()

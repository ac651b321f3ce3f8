"""SmolLM2-135M quantized through qwix (`afpq_jax.qwix`) as a model afpq-jax did not write: perplexity and step time.

The model is examples/nnx_llama.py (bonsai-style NNX: nnx.Einsum attention projections, nnx.Linear MLP) with
SmolLM2's weights; every *_proj goes through `afpq_jax.qwix` (lm_head tied to the embedding, float). Scored like
the other tables (held-out Wikipedia, seq 2048, first 8 windows).

    python -m benchmarks.qwix_smollm2 --rows float,rtn:nf3,rtn:int4,gptq:nf3,gptq:int4 [--calib-samples 128]
    python -m benchmarks.qwix_smollm2 --timing      # compiled forward (1 x 2048): qwix PTQ vs built-in packed model

Rows: RTN = `quantize_params` of the float params into the abstract PTQ model; GPTQ = `GptqCalibration`
(one pass over the float model, Hessians of every weight's float inputs; the built-in GPTQ is block-sequential)
on --calib-samples random windows of --calib-seqlen tokens of the calibration split, then `quantize_params` with
the Hessians. One JSON line per row in --out (reruns skip rows it has), with the commit taken at the start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import perplexity
from benchmarks.experiment import Results, commit
from afpq_jax.qwix import AfpqRule, GptqCalibration, PtqProvider, quantize_params

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from nnx_llama import Llama, LlamaConfig, hf_params  # noqa: E402

SCHEMES = {"nf3": aq.QuantScheme.create("nf3", group_size=128),
           "int4": aq.QuantScheme.create("int4", group_size=128)}


def _rules(scheme: aq.QuantScheme) -> list[AfpqRule]:
    return [AfpqRule(module_path=r"layers/\d+/(attn|mlp)/\w+_proj", scheme=scheme)]


def _abstract_ptq(cfg: LlamaConfig, scheme: aq.QuantScheme) -> Llama:
    probe = jnp.zeros((1, 8), jnp.int32)
    return nnx.eval_shape(lambda: qwix.quantize_model(Llama(cfg, rngs=nnx.Rngs(0)), PtqProvider(_rules(scheme)),
                                                      probe))


def _float_model(cfg: LlamaConfig, params: dict) -> Llama:
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model


def _median_forward_seconds(model, tokens, repeats: int = 5) -> float:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    fn(state, tokens).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(state, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="float,rtn:nf3,rtn:int4,gptq:nf3,gptq:int4")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--timing", action="store_true", help="compiled forward time instead of perplexity rows")
    ap.add_argument("--out", default="results/qwix_smollm2.jsonl")
    args = ap.parse_args()
    code = commit()
    hf = assets.smollm2_hf_dir()
    cfg = LlamaConfig.from_hf(json.loads((hf / "config.json").read_text()))
    params = hf_params(hf, cfg)
    tokenizer = aq.load_tokenizer(hf)
    calib_text, eval_text = assets.wiki_text()
    results = Results(args.out, key=lambda r: r["row"])

    if args.timing:
        tokens = jnp.asarray(aq.tokenize(tokenizer, eval_text)[:2048][None], jnp.int32)
        scheme = SCHEMES["nf3"]
        qmodel = _abstract_ptq(cfg, scheme)
        nnx.update(qmodel, quantize_params(params, qmodel))
        built_in = aq.quantize_pretrained(aq.load(hf), scheme, method=aq.RTN(), progress=False)
        rec = {"row": "timing", "shape": [1, 2048], "scheme": str(scheme), "backend": jax.default_backend(),
               "seconds": {"qwix_ptq": _median_forward_seconds(qmodel, tokens),
                           "built_in_packed": _median_forward_seconds(built_in, tokens),
                           "example_float": _median_forward_seconds(_float_model(cfg, params), tokens)},
               "commit": code}
        results.add(rec)
        return

    eval_ids = aq.tokenize(tokenizer, eval_text)
    for row in args.rows.split(","):
        if row in results:
            continue
        t0 = time.perf_counter()
        info: dict = {}
        if row == "float":
            model = _float_model(cfg, params)
        else:
            method, fmt = row.split(":")
            scheme = SCHEMES[fmt]
            hessians = None
            if method == "gptq":
                calibration = aq.Calibration(text=calib_text, samples=args.calib_samples, seqlen=args.calib_seqlen)
                windows = calibration.windows(cfg.vocab_size, 8192, tokenize=lambda t: aq.tokenize(tokenizer, t))
                cal = GptqCalibration(_rules(scheme))
                cal_model = qwix.quantize_model(_float_model(cfg, params), cal, jnp.asarray(windows[:1]))
                for i in range(0, len(windows), args.calib_batch):
                    cal_model(jnp.asarray(windows[i:i + args.calib_batch]))
                hessians = cal.hessians
                info["calibration_seconds"] = round(time.perf_counter() - t0, 1)
                info["calib"] = f"{args.calib_samples}x{args.calib_seqlen}"
            elif method != "rtn":
                sys.exit(f"unknown method {method!r} in row {row!r}")
            model = _abstract_ptq(cfg, scheme)
            nnx.update(model, quantize_params(params, model, hessians=hessians))
        info["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        r = perplexity(model, eval_ids, seq_len=2048, max_windows=8, progress=False)
        results.add({"row": row, "perplexity": r["perplexity"], "windows": r["windows"], "seq_len": r["seq_len"],
                     **info, "commit": code})


if __name__ == "__main__":
    main()

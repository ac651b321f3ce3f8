"""`python -m afpq_jax.eval`: perplexity on held-out text and generation (greedy or sampled), for a float model
(HF directory, GGUF) or a converted afpq-jax checkpoint.

Also the library functions `perplexity` and `bos_prefix` (the BOS a model's texts start with; `generate`: the
root's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from afpq_jax._src import cli
from afpq_jax._src.errors import InputError
from afpq_jax._src.evaluation import default_seq_len, perplexity
from afpq_jax._src.io.tokenizers import bos_prefix
from afpq_jax._src.generation import generate

__all__ = ["bos_prefix", "main", "perplexity"]  # generate: afpq_jax.generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afpq_jax.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=None,
                   help="converted checkpoint, HF directory, .gguf file, Hub id org/name (needs network), or a "
                        "built-in float model: smollm2-135m-instruct (the default) or gemma3-270m")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file to score (default: the held-out English Wikipedia split)")
    p.add_argument("--seq-len", type=cli.positive_int, default=None,
                   help="window length, 2 up to the model's context (default: min(2048, model context))")
    p.add_argument("--max-windows", type=cli.positive_int, default=None,
                   help="score only the first N windows (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=1, help="windows per forward pass")
    p.add_argument("--prompt", default=None, help="also generate from this prompt")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=cli.positive_int, default=None,
                   help="sample from the k most likely tokens (with --temperature > 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: smallest set reaching this mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--mesh", type=cli.mesh_spec, default=None,
                   help="shard the model over the devices: 'model=4' (tensor parallel) or 'data=2,model=4'")
    cli.add_distributed_flags(p)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--json", action="store_true", help="print results as one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    def run() -> int:
        from afpq_jax import assets
        from afpq_jax._src.generation import check_sampling

        check_sampling(args.temperature, args.top_k, args.top_p)  # before any loading
        if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
            raise InputError("--top-k / --top-p only apply when sampling; add --temperature > 0 (e.g. 0.7) or "
                             "drop them (greedy)")
        if args.seq_len == 1:
            raise InputError("--seq-len must be at least 2 (a window predicts its tokens 2..L from the first)")
        cli.init_distributed(args)
        from afpq_jax._src.checkpoint import load, model_config
        from afpq_jax._src.io.tokenizers import load_tokenizer, tokenize
        from afpq_jax._src.io.files import read_text
        from afpq_jax._src.io.sources import local_path

        text = read_text(args.text, "--text") if args.text and not args.no_ppl else None  # before any loading
        # a Hub id too
        model_path = cli.builtin_model_dir(args.model) if cli.builtin_model(args.model) else str(local_path(args.model))
        if args.seq_len is not None and not args.no_ppl:  # before loading the weights
            context = model_config(model_path).max_seq_len
            if args.seq_len > context:
                raise InputError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens; pass "
                                 f"--seq-len {context} or less")
        t0 = time.perf_counter()
        model = load(model_path, mesh=cli.make_mesh(args.mesh) if args.mesh else None)
        tok = load_tokenizer(model_path)
        result: dict = {"model": model_path, "load_seconds": round(time.perf_counter() - t0, 2)}
        if not args.no_ppl:
            ids = tokenize(tok, text if text is not None else assets.wiki_text()[1])
            t0 = time.perf_counter()
            result.update(perplexity(model, ids, seq_len=args.seq_len or default_seq_len(model),
                                     batch_size=args.batch_size, max_windows=args.max_windows,
                                     progress=not args.no_progress, bos_token_id=bos_prefix(tok)))
            result["ppl_seconds"] = round(time.perf_counter() - t0, 2)
        if args.prompt:
            ids = tok(args.prompt)["input_ids"]  # with the tokenizer's BOS, if it adds one (Gemma)
            new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, key=args.seed, eos_token_id=tok.eos_token_id)
            result["prompt"] = args.prompt
            result["generation"] = tok.decode(new[0].tolist(), skip_special_tokens=True)
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k:>14}: {v:.4f}" if isinstance(v, float) else f"{k:>14}: {v}")
        return 0

    return cli.run(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())

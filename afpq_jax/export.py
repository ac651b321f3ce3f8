"""`python -m afpq_jax.export`: a quantized model as a Hugging Face directory that serving stacks read —
compressed-tensors (vLLM, transformers), GPTQ (GPTQModel, vLLM) or the afpq safetensors layout (every scheme).

  python -m afpq_jax.export --model CKPT --format compressed-tensors --out DIR

``--model`` is anything `afpq_jax.load` reads: a converted afpq-jax checkpoint, or a GPTQ / AWQ /
compressed-tensors / afpq directory (to convert between them). Also the library function `export`, which this
module is itself callable as: ``afpq_jax.export(model, out, format=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

from afpq_jax._src import cli
from afpq_jax._src.models import CausalLM
from afpq_jax._src.interop.hf_export import FLOAT_DTYPES, TARGETS, ExportResult
from afpq_jax._src.interop.hf_export import export as _export

__all__ = ["ExportResult", "TARGETS", "export", "main"]


def export(model: CausalLM, out: str | os.PathLike, *, format: str = "compressed-tensors",
           dequantize_unsupported: bool = False,
           dtype: str | None = None, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
           progress: bool = False) -> ExportResult:
    """Writes ``model`` (an afpq_jax `CausalLM` with packed layers) to ``out`` in ``format`` (`TARGETS`):
    safetensors shards of at most ``max_shard_bytes``, config.json with its ``quantization_config``, the
    tokenizer. A layer the format cannot hold exactly is refused, the layers named, unless
    ``dequantize_unsupported`` (written as bfloat16, listed in the result). ``dtype``: of the float tensors
    (default: the source model's ``torch_dtype``). Nothing appears at ``out`` unless everything was written."""
    return _export(model, out, target=format, dequantize_unsupported=dequantize_unsupported, dtype=dtype,
                   overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afpq_jax.export", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True,
                   help="converted afpq-jax checkpoint, or a GPTQ / AWQ / compressed-tensors / afpq directory")
    p.add_argument("--format", choices=TARGETS, default="compressed-tensors", help="the layout to write")
    p.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    p.add_argument("--dequantize-unsupported", action="store_true",
                   help="write layers the format cannot hold exactly as bfloat16 (listed) instead of refusing")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default=None,
                   help="dtype of the float tensors and config.json's torch_dtype (default: the source model's "
                        "torch_dtype); compressed-tensors' INT scales are written in it")
    p.add_argument("--max-shard-size", type=cli.byte_size, default=5 * 10**9,
                   help="largest safetensors shard, e.g. 5G or 500M (default: 5 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing afpq-jax output at --out")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    def run() -> int:
        from afpq_jax._src.checkpoint import load
        from afpq_jax._src.io import outputs

        out = Path(args.out)
        outputs.check_separate(out, [args.model], "--out")  # before loading
        t0 = time.perf_counter()
        model = load(args.model)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = export(model, out, format=args.format, dequantize_unsupported=args.dequantize_unsupported,
                        dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                        progress=not args.no_progress)
        summary = {"out": str(result.path), "format": result.target, "shards": list(result.shards),
                   "bytes": result.total_bytes, "dequantized": list(result.dequantized),
                   "warnings": list(result.warnings),
                   "load_seconds": round(load_s, 2), "export_seconds": round(time.perf_counter() - t0, 2)}
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"wrote {result.path} ({result.target}, {len(result.shards)} shard(s), "
                  f"{result.total_bytes / 2**20:.1f} MiB) in {summary['export_seconds']:.1f} s")
            if result.dequantized:
                print(f"written as bfloat16 (no exact {result.target} form): {', '.join(result.dequantized)}")
        return 0

    return cli.run(run, args.debug)


class _CallableModule(types.ModuleType):
    """``afpq_jax.export(...)`` is `export`: the verb and the command share one name (a root function of that
    name would be replaced by this module as soon as anything imported it)."""

    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())

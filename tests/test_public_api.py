"""The public surface: the README example, one home per public name, scripts and examples on the public API only, no
asset fetcher on import."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import afpq_jax as aq
import afpq_jax.calibration

ROOT = Path(__file__).parent.parent


# ---- layering ------------------------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_scripts_examples_and_pallas_kernels_use_only_the_public_api():
    files = (sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
             + sorted((ROOT / "examples").glob("*.py"))
             + sorted((ROOT / "pallas_kernels").rglob("*.py")))
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imports(f) if m.startswith("afpq_jax._src"))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_library_import_does_not_pull_in_the_asset_fetcher():
    code = ("import sys, afpq_jax, afpq_jax.kernels, pallas_kernels\n"
            "assert 'afpq_jax._src.assets' not in sys.modules, 'assets imported'\n"
            "assert 'pallas_kernels' not in {m.split('.')[0] for m in sys.modules if m.startswith('afpq_jax')}\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _small_smollm2_cache(cache: Path, real_hf_dir: Path, real_text_dir: Path) -> None:
    """An asset cache whose "SmolLM2" is a random 6-block model with SmolLM2's tokenizer and vocabulary (and the
    real Wikipedia split): code written for the built-in model runs as is, in seconds instead of minutes."""
    from safetensors.numpy import save_file
    hf = cache / real_hf_dir.parent.name / real_hf_dir.name  # the same place in the cache as the real one
    hf.mkdir(parents=True)
    for f in real_hf_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            (hf / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((real_hf_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (hf / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    v, h, i = cfg["vocab_size"], 64, 128
    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for b in range(6):
        p = f"model.layers.{b}."
        t.update({p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                  p + "self_attn.q_proj.weight": w(64, h), p + "self_attn.k_proj.weight": w(32, h),
                  p + "self_attn.v_proj.weight": w(32, h), p + "self_attn.o_proj.weight": w(h, 64),
                  p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                  p + "mlp.down_proj.weight": w(h, i)})
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(v, h)
    save_file(t, str(hf / "model.safetensors"))
    text = cache / real_text_dir.parent.name / real_text_dir.name
    text.mkdir(parents=True)
    for name in ("calibration.txt", "evaluation.txt"):
        (text / name).write_bytes((real_text_dir / name).read_bytes())


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path, real_hf_dir, real_text):
    """The README's Python API example, verbatim (the built-in model: a 6-block SmolLM2-shaped model with its real
    tokenizer and text, so the API runs end to end in seconds; the real model's conversions are test_smollm2's)."""
    from afpq_jax import assets
    cache = tmp_path / "cache"
    _small_smollm2_cache(cache, real_hf_dir, assets.wiki_text_paths()[0].parent)
    shared = assets.cache_dir() / "kernels"  # the C++ kernel built once for the whole suite, not again here (5 s)
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "kernels").symlink_to(shared, target_is_directory=True)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "AFPQ_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "nf4-asym-g128"
    qc = json.loads((tmp_path / "out" / "smollm2-gptq-mixed" / "quantization_config.json").read_text())
    assert qc["method"] == "gptq" and qc["layers"]["layers.5.attn.q_proj"]["format"] == "nf3"
    assert "lm_head" not in qc["layers"] and qc["calibration"]["samples"] == 8


def test_each_public_name_has_one_home():
    """The root holds the main job's nouns and verbs; every other public name lives in exactly one submodule
    (`__all__` of each public module); names that moved stay reachable from the root with a warning."""
    import importlib
    import inspect
    import warnings
    homes: dict[str, list[str]] = {}
    for name in ("afpq_jax", "afpq_jax.formats", "afpq_jax.calibration", "afpq_jax.algorithms", "afpq_jax.training",
                 "afpq_jax.kernels", "afpq_jax.eval", "afpq_jax.export", "afpq_jax.assets", "afpq_jax.memory",
                 "afpq_jax.qwix", "afpq_jax.lm_eval",
                 "pallas_kernels"):
        module = importlib.import_module(name)
        for public in module.__all__:
            if public == "main":  # every command's entry point (python -m afpq_jax.eval / .export)
                continue
            if not inspect.ismodule(getattr(module, public)):
                homes.setdefault(public, []).append(name)
    assert {n: m for n, m in homes.items() if len(m) > 1} == {}
    assert len(aq.__all__) <= 36 and importlib.import_module("pallas_kernels").__all__ == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert aq.get_format is aq.formats.get_format and aq.Method is aq.calibration.Method
    assert [str(w.message) for w in caught] == ["afpq_jax.get_format moved to afpq_jax.formats.get_format",
                                                "afpq_jax.Method moved to afpq_jax.calibration.Method"]
    with pytest.raises(AttributeError):
        aq.no_such_name

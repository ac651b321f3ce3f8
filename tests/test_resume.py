"""Resumable conversion: a conversion killed after a block continues from its saved progress and writes the same
checkpoint as an uninterrupted run; nothing appears at --out before the end; another conversion's progress is
refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax._src.calibration.progress import CRASH_HOOK

FIXTURES = Path(__file__).parent / "fixtures"


def _args(out: Path, method: str, *extra: str) -> list[str]:
    return ["--model", str(FIXTURES / "llama_gqa"), "--format", "nf3", "--group-size", "16", "--method", method,
            "--calib-random", "--calib-samples", "4", "--calib-seqlen", "16", "--out", str(out), "--no-progress",
            *extra]


def _state(path: Path) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(aq.load(path)))}


@pytest.mark.parametrize("method", ["awq"])  # AWQ + clip: random row sampling, so the saved rng state matters
def test_killed_conversion_resumes_to_the_uninterrupted_checkpoint(tmp_path, method, capsys):
    out = tmp_path / "q"
    progress = tmp_path / ".q.progress"
    env = {**os.environ, CRASH_HOOK: "0", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", *_args(out, method, "--save-progress")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]  # killed right after block 0 was saved
    assert not out.exists() and (progress / "block_0000.npz").exists()
    assert json.loads((progress / "progress.json").read_text())["done"] == 0
    assert convert_cli.main(_args(out, method, "--resume")) == 0, capsys.readouterr().err
    assert not progress.exists()
    whole = tmp_path / "whole"
    assert convert_cli.main(_args(whole, method)) == 0
    a, b = _state(out), _state(whole)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    qa, qb = (json.loads((d / "quantization_config.json").read_text()) for d in (out, whole))
    assert qa == qb


def test_resume_refuses_another_conversions_progress_and_needs_progress(tmp_path, capsys):
    out = tmp_path / "q"
    rc = convert_cli.main(_args(out, "gptq", "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to resume" in err and "Traceback" not in err
    env = {**os.environ, CRASH_HOOK: "0", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", *_args(out, "gptq", "--save-progress")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    rc = convert_cli.main(_args(out, "gptq", "--resume", "--damp", "0.05"))
    err = capsys.readouterr().err
    assert rc == 2 and "progress of a different conversion" in err and not out.exists()
    assert (tmp_path / ".q.progress" / "progress.json").exists()  # left as it was


def test_rtn_streaming_saves_progress_without_activations(tmp_path):
    scheme = aq.QuantScheme.create("int4", group_size=16)
    a = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, progress_dir=tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "progress.json").read_text())
    assert saved["done"] == 1 and not saved["activations"] and not (tmp_path / "p" / "activations.npy").exists()
    # resuming a finished run only assembles the saved blocks: the same model
    b = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, progress_dir=tmp_path / "p",
                               resume=True)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(aq.InputError, match="needs progress_dir"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, resume=True)


MEASURE = """
import resource, sys, json
import numpy as np
import afpq_jax as aq
from flax import nnx
src, budget, spill = sys.argv[1], sys.argv[2], sys.argv[3]
cal = aq.Calibration(random=True, samples=3072, seqlen=256, batch_size=32)
m = aq.quantize_pretrained(src, aq.QuantScheme.create("int4", group_size=64), method="gptq", calibration=cal,
                           progress=False, max_memory=None if budget == "none" else int(budget), spill_dir=spill)
digest = float(sum(np.asarray(v.get_value(), np.float64).sum() for _, v in nnx.to_flat_state(nnx.state(m))))
# VmHWM: this program's peak (ru_maxrss would include the pytest worker's RSS at fork, kept across exec)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak_kb / 1024, "digest": digest}))
"""


def _synthetic_llama(directory: Path, hidden: int = 512, layers: int = 2, vocab: int = 512) -> Path:
    """A random Hugging Face LLaMA directory (safetensors) of the given size."""
    from safetensors.numpy import save_file
    directory.mkdir()
    inter, heads = 2 * hidden, hidden // 64
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "vocab_size": vocab, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                  **{p + f"self_attn.{n}_proj.weight": w(hidden, hidden) for n in "qkvo"},
                  p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                  p + "mlp.down_proj.weight": w(hidden, inter)})
    save_file(t, str(directory / "model.safetensors"))
    return directory


def test_memory_budget_spills_activations_to_disk_with_the_same_result(tmp_path):
    """3072 x 256 x 64 float32 activations = 192 MiB; a 64 MiB budget keeps them in a file (page cache): the
    peak RSS drops by most of that, the quantized model is the same, and the spill file is gone afterwards.
    (A narrow model: the same activation bytes for about a quarter of the compute of hidden 512.)"""
    src = _synthetic_llama(tmp_path / "model", hidden=64)
    spill = tmp_path / "spill"
    spill.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {}
    for budget in ("none", str(64 * 2**20)):
        r = subprocess.run([sys.executable, "-c", MEASURE, str(src), budget, str(spill)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[budget] = json.loads(r.stdout.strip().splitlines()[-1])
    full, capped = runs["none"], runs[str(64 * 2**20)]
    assert capped["digest"] == full["digest"]
    assert capped["peak_mb"] < full["peak_mb"] - 100, runs  # run-to-run noise measured: ~35 MB
    assert list(spill.iterdir()) == []


def _with_changed_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of the model ``src`` with one value of tensor ``name`` changed: the same architecture, other weights."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 0.01
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_resume_refuses_the_progress_of_another_models_weights(tmp_path, capsys):
    """Was: progress saved from model A, --resume with model B of the same architecture -> exit 0, the first
    blocks from A and the rest from B (the fingerprint covered config, layout and options, not the weights)."""
    a = FIXTURES / "llama_gqa"
    progress = tmp_path / ".q.progress"
    scheme = aq.QuantScheme.create("nf3", group_size=16)
    aq.quantize_pretrained(a, scheme, progress=False, progress_dir=progress)  # every block saved, kept
    saved = {p.name: p.read_bytes() for p in progress.iterdir()}
    cli = ["--format", "nf3", "--group-size", "16", "--out", str(tmp_path / "q"), "--resume", "--no-progress"]
    for tensor, what in [("model.layers.0.mlp.up_proj.weight", "weights of block 0"),
                         ("model.embed_tokens.weight", "embeddings / output layers"),
                         ("lm_head.weight", "embeddings / output layers")]:
        b = _with_changed_tensor(a, tmp_path / tensor, tensor)
        with pytest.raises(aq.CheckpointError, match=f"model's {what} differ from those of the interrupted"):
            aq.quantize_pretrained(b, scheme, progress=False, progress_dir=progress, resume=True)
        assert convert_cli.main(["--model", str(b), *cli]) == 2
        assert f"the model's {what} differ" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in progress.iterdir()} == saved and not (tmp_path / "q").exists()
    same = tmp_path / "copy"
    shutil.copytree(a, same)  # the same weights elsewhere: resumes
    assert convert_cli.main(["--model", str(same), *cli]) == 0 and not progress.exists()


def test_starting_over_never_deletes_what_progress_did_not_write(tmp_path):
    from afpq_jax._src.calibration.progress import BlockProgress
    d = tmp_path / ".q.progress"
    d.mkdir()
    (d / "block_0000.npz").write_bytes(b"old")
    (d / "thesis.tex").write_text("mine")
    with pytest.raises(aq.OutputError, match="holds thesis.tex, which a conversion's progress never does"):
        BlockProgress(d, "fingerprint").start_over()
    assert sorted(p.name for p in d.iterdir()) == ["block_0000.npz", "thesis.tex"]


def test_saving_progress_again_never_deletes_an_interrupted_conversions_progress(tmp_path, capsys):
    """The same --save-progress command without --resume silently deleted the saved blocks."""
    progress = tmp_path / ".q.progress"
    aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("nf3", group_size=16), progress=False,
                           progress_dir=progress)
    saved = {p.name: p.read_bytes() for p in progress.iterdir()}
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--format", "nf3", "--group-size", "16",
                             "--out", str(tmp_path / "q"), "--save-progress", "--no-progress"]) == 2
    assert "pass --resume to continue it, or delete that directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in progress.iterdir()} == saved
    state = json.loads((progress / "progress.json").read_text())
    del state["source_outer"]  # as an afpq-jax before the weight digests wrote it
    (progress / "progress.json").write_text(json.dumps(state))
    with pytest.raises(aq.CheckpointError, match="saved by an older afpq-jax, without digests"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("nf3", group_size=16), progress=False,
                               progress_dir=progress, resume=True)

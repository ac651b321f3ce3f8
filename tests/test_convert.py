"""convert -> checkpoint -> load -> eval, the CLI's bad-input behaviour, and honest on-disk size."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax import kernels
from afpq_jax import eval as eval_cli
from afpq_jax._src import checkpoint
from afpq_jax._src.evaluation import perplexity
from tests import test_gguf

FIXTURES = Path(__file__).parent / "fixtures"


def fake_quantized_reference(src, fmt, group_size, asym, include_lm_head=False):
    model = aq.load(src)
    for path, layer in model.linear_layers().items():
        if path != "lm_head" or include_lm_head:
            layer.kernel.set_value(aq.fake_quant(layer.kernel.get_value(), fmt, group_size=group_size, asym=asym))
    return model


@pytest.mark.parametrize("fixture,args,fmt,g,asym,lm_head", [
    ("llama_gqa", ["--format", "nf3", "--group-size", "32"], "nf3", 32, True, False),
    ("llama_gqa", ["--format", "int4", "--sym", "--group-size", "none", "--quantize-lm-head"], "int4", None, False,
     True),
    ("bloom", ["--format", "fp4", "--group-size", "48"], "fp4_e2m1", 48, True, False),
    ("llama3_rope", ["--format", "int3"], "int3", 128, True, False),
])
def test_roundtrip_logits_equal_in_memory_fake_quant(tmp_path, monkeypatch, fixture, args, fmt, g, asym, lm_head):
    out = tmp_path / "ckpt"
    assert convert_cli.main(["--model", str(FIXTURES / fixture), "--out", str(out), "--no-progress", *args]) == 0
    qc = json.loads((out / "quantization_config.json").read_text())
    assert qc["method"] == "rtn" and qc["layers"]
    assert all(s == {"format": fmt, "group_size": g, "asym": asym, "scale_dtype": "float16"}
               for s in qc["layers"].values())
    assert ("lm_head" in qc["layers"]) == lm_head
    loaded = aq.load(out)
    layers = loaded.linear_layers()
    assert all(layers[p].is_quantized == (p in qc["layers"]) for p in layers)
    ids = jnp.asarray(np.load(FIXTURES / fixture / "reference.npz")["input_ids"])
    want = np.asarray(fake_quantized_reference(FIXTURES / fixture, fmt, g, asym, lm_head)(ids))
    # The default CPU dispatch (the C++ kernel up to 256 rows) sums in another order than XLA's dot.
    np.testing.assert_allclose(np.asarray(loaded(ids)), want, rtol=1e-4, atol=1e-4)
    # Dequantize-then-dot reproduces the fake-quantized model bit for bit: the packed weights are exactly its
    # weights.
    monkeypatch.setitem(kernels.DISPATCH_ORDER, "cpu", ("xla",))
    np.testing.assert_array_equal(np.asarray(aq.load(out)(ids)), want)


def _write_model(d: Path, hidden=256, inter=512, layers=2, vocab=64, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "max_position_embeddings": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    kv = hidden // 2
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)),
              p + "self_attn.k_proj.weight": rng.standard_normal((kv, hidden)),
              p + "self_attn.v_proj.weight": rng.standard_normal((kv, hidden)),
              p + "self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)),
              p + "mlp.gate_proj.weight": rng.standard_normal((inter, hidden)),
              p + "mlp.up_proj.weight": rng.standard_normal((inter, hidden)),
              p + "mlp.down_proj.weight": rng.standard_normal((hidden, inter)),
              p + "input_layernorm.weight": np.ones(hidden), p + "post_attention_layernorm.weight": np.ones(hidden)}
    save_file({k: (v * 0.02).astype(np.float32) for k, v in t.items()}, str(d / "model.safetensors"))
    return d


def _payload_bytes(params_dir: Path) -> int:
    """Bytes of orbax's array data files (no metadata/manifests)."""
    return sum(f.stat().st_size for f in params_dir.rglob("*") if f.is_file() and f.parent.name == "d")


def test_on_disk_size_of_4bit_g128_layers(tmp_path):
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    src = _write_model(tmp_path / "src")
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(src), "--out", str(out), "--format", "nf4", "--no-progress"]) == 0
    model = aq.load(out)
    n_weights = sum(layer.in_features * layer.out_features for layer in model.linear_layers().values())
    # The float part (embeddings, norms) saved alone, the same way, gives the bytes to subtract.
    float_tree = jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp_path / "float_only").absolute(), float_tree)
    ckpt.wait_until_finished()
    quant_bits = 8 * (_payload_bytes(out / "params") - _payload_bytes(tmp_path / "float_only")) / n_weights
    # 15%: orbax's OCDBT writes a timing-dependent number of data files, each with some overhead (a quiet
    # machine measured ~4.25 bits, loaded ones 4.36, 4.38 and 4.64); a packing error would be off by >= 25%.
    assert abs(quant_bits / (4 + 32 / 128) - 1) < 0.15, quant_bits


def _cli_error(capsys, argv):
    rc = convert_cli.main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(tmp_path, name="llama_gqa") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "does not exist" in _cli_error(capsys, ["--model", str(tmp_path / "nope"), *out])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _cli_error(capsys, ["--model", str(tmp_path / "empty"), *out])

    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    assert "unsupported model_type 'gpt_neox'; supported: bloom, llama, mistral" in _cli_error(
        capsys, ["--model", str(d), *out])
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 150}))
    assert "config.json does not match the weights" in _cli_error(capsys, ["--model", str(d), *out])
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(capsys, ["--model", str(d), *out])

    d2 = _copy(tmp_path / "t")
    st = d2 / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert "truncated" in _cli_error(capsys, ["--model", str(d2), *out])
    st.write_bytes(b"\xff" * 64)
    assert "corrupted" in _cli_error(capsys, ["--model", str(d2), *out])

    assert "unknown format 'fp5'" in _cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--format", "fp5",
                                                         *out])
    assert "tied" in _cli_error(capsys, ["--model", str(FIXTURES / "bloom"), "--quantize-lm-head", *out])
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "already exists" in _cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "precious"
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--overwrite",
                             "--no-progress"]) == 0
    assert not (out / "keep.txt").exists() and checkpoint.is_converted_checkpoint(out)


@pytest.mark.parametrize("exc,rc", [(KeyboardInterrupt, 130), (OSError, 2)])
def test_interrupted_conversion_leaves_nothing(tmp_path, capsys, monkeypatch, exc, rc):
    out = tmp_path / "o"
    real_save = checkpoint.save

    def save_then_die(model, directory, **kw):
        real_save(model, directory, **kw)  # the staging dir is fully written, then we die before the rename
        raise exc("disk full" if exc is OSError else "")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]) == rc
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial staging directory left behind
    # an existing checkpoint survives a failed --overwrite
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--overwrite", "--no-progress"])
    assert sorted(p.name for p in out.rglob("*")) == before and aq.load(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_cli_exit_codes_and_help_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ["--model", "--format", "--group-size", "--sym", "--method", "--out", "--overwrite",
                 "--quantize-lm-head", "--scale-dtype", "--debug"]:
        assert flag in r.stdout
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--group-size", "0.5"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "group size" in r.stderr


def test_gguf_model_converts_with_its_tokenizer_and_evaluates(tmp_path, capsys):
    weights = test_gguf._hf_weights(np.random.default_rng(3), tied=True)
    src = test_gguf.write_tiny_llama(tmp_path / "tiny.gguf", weights)
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(src), "--out", str(out), "--format", "fp3", "--group-size", "16",
                             "--no-progress"]) == 0
    assert (out / "tokenizer.json").exists()
    tok = aq.load_tokenizer(out)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["hello world"] * 200))
    capsys.readouterr()
    assert eval_cli.main(["--model", str(out), "--text", str(text), "--seq-len", "16", "--json", "--no-progress",
                          "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert res["windows"] == len(ids) // 16 and isinstance(res["generation"], str)
    assert res["perplexity"] == pytest.approx(perplexity(aq.load(out), ids, seq_len=16, progress=False)["perplexity"])


def test_perplexity_matches_numpy():
    model = aq.load(FIXTURES / "llama_gqa")
    ids = np.random.default_rng(0).integers(0, 256, 50).astype(np.int32)
    got = perplexity(model, ids, seq_len=12, batch_size=2, progress=False)
    windows = ids[:48].reshape(4, 12)
    logits = np.asarray(model(jnp.asarray(windows)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert got["windows"] == 4 and got["tokens"] == 44
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:5], seq_len=12, progress=False)


def test_hub_id_without_network_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; fail fast instead of timing out
    from afpq_jax import CheckpointError
    from afpq_jax._src.io.sources import open_source
    with pytest.raises(CheckpointError, match="without network access pass a local directory"):
        open_source("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_chunked_tokenization_matches_whole_text_at_paragraph_boundaries():
    from afpq_jax import tokenize
    weights = test_gguf._hf_weights(np.random.default_rng(5), tied=True)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = aq.load_tokenizer(test_gguf.write_tiny_llama(Path(d) / "t.gguf", weights))
    paragraphs = [" ".join(["hello world"] * (3 + i % 5)) for i in range(40)]
    text = "\n\n".join(paragraphs)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    chunked = tokenize(tok, text, chunk_chars=50)
    assert chunked.dtype == np.int32 and chunked.tolist() == whole

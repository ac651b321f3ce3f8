"""Sharding on device meshes: the split rules, and sharded = unsharded loading, scoring and conversion on simulated
CPU devices and processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import afpq_jax as aq
from afpq_jax._src.sharding import partition_spec
from tests.support import FIXTURES, simulated_devices

NF3 = aq.QuantScheme.create("nf3", group_size=16)


def _mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("path,shape,scheme,k,mesh,expect", [
    (("layers", 0, "attn", "q_proj", "kernel"), (64, 64), None, 64, (1, 4), P(None, "model")),
    (("layers", 0, "attn", "q_proj", "codes"), (24, 64), NF3, 64, (1, 4), P(None, "model")),
    (("layers", 0, "attn", "q_proj", "scale"), (4, 64), NF3, 64, (1, 4), P(None, "model")),
    (("layers", 0, "attn", "k_proj", "kernel"), (64, 6), None, 64, (1, 4), P(None, None)),  # 6 % 4: whole
    (("layers", 0, "mlp", "gate_proj", "channel_scale"), (160,), NF3, 64, (1, 4), P("model")),
    (("layers", 0, "attn", "o_proj", "kernel"), (64, 64), None, 64, (1, 4), P("model", None)),
    (("layers", 0, "attn", "o_proj", "codes"), (24, 64), NF3, 64, (1, 4), P("model", None)),  # 64 = 4 x 16
    (("layers", 0, "mlp", "down_proj", "codes"), (60, 64), NF3, 160, (1, 4), P(None, None)),  # 40 per shard
    (("layers", 0, "mlp", "down_proj", "scale"), (10, 64), NF3, 160, (1, 4), P(None, None)),
    (("layers", 0, "mlp", "down_proj", "kernel"), (160, 64), None, 160, (1, 4), P("model", None)),
    (("embed", "weight"), (256, 64), None, None, (1, 4), P("model", None)),
    (("layers", 0, "input_norm", "weight"), (64,), None, None, (1, 4), P(None)),
    (("layers", 0, "attn", "q_proj", "kernel"), (64, 64), None, 64, (2, 2), P("data", "model")),
    (("layers", 0, "attn", "o_proj", "kernel"), (64, 64), None, 64, (2, 2), P("model", "data")),
    (("layers", 0, "attn", "q_proj", "kernel"), (64, 64), None, 64, (4, 1), P("data", None)),
    (("lm_head", "kernel"), (64, 256), None, 64, (2, 2), P("data", "model")),
])
def test_partition_rules(path, shape, scheme, k, mesh, expect):
    assert partition_spec(path, shape, _mesh(*mesh), scheme, k) == expect


def _word_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json whose ids fit the fixture's 256-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = "the quick brown fox jumps over lazy dog hello".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _text(directory: Path) -> Path:
    text = directory / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40, encoding="utf-8")
    return text


SHARDED_LOAD = textwrap.dedent("""
    import sys, tempfile, subprocess, json
    import jax, jax.numpy as jnp, numpy as np
    import afpq_jax as aq
    fx = sys.argv[1]
    assert jax.device_count() == 4
    ids = jnp.asarray(np.arange(40).reshape(2, 20) * 7 % 256)
    float_model = aq.load(fx)
    scheme = aq.QuantScheme.create("nf3", group_size=16)
    packed = aq.quantize_pretrained(float_model, scheme, method=aq.RTN(), progress=False)
    ckpt = tempfile.mkdtemp() + "/ckpt"
    aq.save(packed, ckpt)
    import shutil; shutil.copy(sys.argv[3], ckpt + "/tokenizer.json")
    refs = {fx: np.asarray(float_model(ids)), ckpt: np.asarray(packed(ids))}
    from afpq_jax._src.io import sources   # record what the float load reads
    whole, sliced = [], []
    read, read_slice = sources.Source.read, sources.Source.read_slice
    sources.Source.read = lambda self, n: (whole.append(n), read(self, n))[1]
    sources.Source.read_slice = lambda self, n, i: (sliced.append((n, i)), read_slice(self, n, i))[1]
    for shape in ((1, 4), (2, 2)):
        mesh = jax.make_mesh(shape, ("data", "model"))   # Explicit axes by default: load makes them Auto
        for path, ref in refs.items():
            whole.clear(); sliced.clear()
            model = aq.load(path, mesh=mesh)
            if path == fx:  # every tensor (blocks, embedding, norms): each shard read on its own, never whole
                assert not whole, whole
                assert any(n == "model.embed_tokens.weight" for n, _ in sliced), sliced
                ups = [i for n, i in sliced if n == "model.layers.0.mlp.up_proj.weight"]
                assert len(ups) == 4 and {i[0].stop - i[0].start for i in ups} == {160 // shape[1]}, ups
            up = model.layers[0].mlp.up_proj
            leaf = (up.codes if up.is_quantized else up.kernel).get_value()
            assert leaf.sharding.spec == jax.sharding.PartitionSpec(
                "data" if shape[0] > 1 else None, "model"), leaf.sharding
            assert len(leaf.addressable_shards) == 4 and leaf.addressable_shards[0].data.shape[1] == 160 // shape[1]
            out = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    r = subprocess.run([sys.executable, "-m", "afpq_jax.eval", "--model", ckpt, "--text", sys.argv[2],
                        "--seq-len", "16", "--mesh", "data=2,model=2", "--prompt", "hello", "--max-new-tokens", "3",
                        "--json", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.isfinite(json.loads(r.stdout)["perplexity"])
    print("OK")
""")


def test_sharded_load_equals_unsharded_on_4_devices(tmp_path):
    """Also the C++ kernel under 4 devices sharing XLA's thread pool: a kernel call that waited for its
    helper task to start deadlocked here (5cdb665), hence a timeout well short of the suite's patience."""
    _word_tokenizer(tmp_path / "tokenizer.json")
    text = _text(tmp_path)
    env = {**os.environ, "XLA_FLAGS": simulated_devices(4), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(FIXTURES / "llama_gqa"), str(text),
                        str(tmp_path / "tokenizer.json")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_loopback_score_like_one(tmp_path, capsys):
    """2 processes x 2 simulated CPU devices (jax.distributed, gloo collectives): the packed checkpoint is
    restored into shards spanning both processes and scores the perplexity of a single process (this one)."""
    from afpq_jax import eval as eval_cli
    scheme = aq.QuantScheme.create("nf3", group_size=16)
    ckpt = tmp_path / "ckpt"
    aq.save(aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False), ckpt)
    _word_tokenizer(ckpt / "tokenizer.json")
    text = _text(tmp_path)
    flags = ["--model", str(ckpt), "--text", str(text), "--seq-len", "16", "--json", "--no-progress"]
    assert eval_cli.main(flags) == 0
    single_out = capsys.readouterr().out
    base = [sys.executable, "-m", "afpq_jax.eval", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    env2 = {**env, "XLA_FLAGS": simulated_devices(2)}
    procs = [subprocess.Popen([*base, "--mesh", "data=2,model=2", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)], env=env2, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    import json
    want = json.loads(single_out.strip().splitlines()[-1])["perplexity"]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["perplexity"] == pytest.approx(want, rel=1e-5)


CONVERT_ON_MESH = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    import afpq_jax as aq
    fx = sys.argv[1]
    mesh = jax.make_mesh((4, 1), ("data", "model"))
    cal = aq.Calibration(random=True, samples=8, seqlen=16, batch_size=4, search_batch_size=4)
    scheme = aq.QuantScheme.create("nf3", group_size=16)

    def leaves(m):
        return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}

    for method in ("rtn", "gptq", "awq"):
        one = leaves(aq.quantize_pretrained(fx, scheme, method=method, calibration=cal, progress=False))
        four_model = aq.quantize_pretrained(fx, scheme, method=method, calibration=cal, progress=False, mesh=mesh)
        assert len(four_model.layers[0].mlp.up_proj.codes.get_value().sharding.device_set) == 4
        four = leaves(four_model)
        assert one.keys() == four.keys()
        for k in one:
            a, b = one[k].astype(np.float32), four[k].astype(np.float32)
            if method == "rtn":
                np.testing.assert_array_equal(one[k], four[k], err_msg=k)
            else:  # a flipped near-tie code moves GPTQ's later updates (AWQ's next block's inputs) a little
                close = np.mean(np.isclose(a, b, rtol=2e-3, atol=1e-4))
                assert close > 0.99, (k, close)
    print("OK")
""")


def test_conversion_on_4_devices_equals_1_device():
    """RTN: identical arrays; GPTQ with its calibration minibatches split over 4 devices (XTX summed across
    them by XLA) and its columns over 4 devices, AWQ with its search minibatches split over 4 devices and the clip
    search's columns over 4 devices: codes equal but for near-ties, scales within float tolerance."""
    env = {**os.environ, "XLA_FLAGS": simulated_devices(4), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", CONVERT_ON_MESH, str(FIXTURES / "llama_gqa")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def _leaves(path):
    from flax import nnx
    m = aq.load(path)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}


def test_two_process_conversion_equals_one_process(tmp_path):
    """`convert --coordinator ... --mesh data=4` on 2 processes x 2 simulated devices (gloo over loopback): the
    calibration minibatches split over both hosts' devices, GPTQ's columns over all four, each process writes
    its shards of one orbax checkpoint (process 0 the JSON) into one staging directory renamed at the end.
    Compared with this process converting alone on one device (the 4-device mesh in one process equals one device:
    test_conversion_on_4_devices_equals_1_device): RTN identical; GPTQ equal up to near-tie rounding. The
    cross-host sums add in another order, and GPTQ's error feedback on this tiny, 64-token calibration turns a
    last-bit difference into a few flipped codes (measured against one process on the same mesh: up to 1.4% of a
    layer's code bytes and 1.7% of its scales outside the tolerance below). Losing half the statistics (a real
    sharding bug) changes 65% of codes."""
    import json

    from afpq_jax import convert as convert_cli
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": simulated_devices(2)}
    base = ["--model", str(FIXTURES / "llama_gqa"), "--format", "nf3", "--group-size", "16", "--no-progress"]
    gptq = ["--method", "gptq", "--calib-random", "--calib-samples", "4", "--calib-seqlen", "16",
            "--calib-batch-size", "4"]
    for name, extra in (("rtn", []), ("gptq", gptq)):
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "afpq_jax.convert", *base, *extra, "--out",
                                   str(tmp_path / f"{name}-2p"), "--mesh", "data=4", "--coordinator",
                                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        # --mesh data=1: the search minibatches follow --calib-batch-size as on any mesh
        assert convert_cli.main([*base, *extra, "--out", str(tmp_path / f"{name}-1p"), "--mesh", "data=1"]) == 0
    assert not list(tmp_path.glob(".*partial*"))  # the staging directories are gone
    for name in ("rtn", "gptq"):
        one, two = _leaves(tmp_path / f"{name}-1p"), _leaves(tmp_path / f"{name}-2p")
        assert one.keys() == two.keys()
        cfg1, cfg2 = (json.loads((tmp_path / f"{name}-{n}" / "quantization_config.json").read_text())
                      for n in ("1p", "2p"))
        assert cfg1 == cfg2
        for k in one:
            if name == "rtn":
                np.testing.assert_array_equal(one[k], two[k], err_msg=k)
            else:
                a, b = one[k].astype(np.float32), two[k].astype(np.float32)
                assert np.mean(np.isclose(a, b, rtol=2e-3, atol=1e-4)) > 0.95, k


def test_every_process_fails_alike_when_the_output_cannot_be_claimed(tmp_path):
    """Only process 0 locks --out (and sweeps); the others learn its verdict, so all exit 2 with its one line
    instead of quantizing on and dying in a collective (a 34-line traceback after 30 s, found by a review)."""
    from tests.support import HOLD
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "afpq_jax.convert", "--model", str(FIXTURES / "llama_gqa"),
                                   "--out", str(out), "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", "2", "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        errors = []
        for p in procs:
            _, err = p.communicate(timeout=300)
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
            errors.append(lines[0])
        assert errors[0] == errors[1] and f"(pid {holder.pid}) is writing --out {out}" in errors[0]
    finally:
        holder.kill()
        holder.wait()

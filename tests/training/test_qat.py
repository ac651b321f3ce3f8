"""Quantization-aware training (BitDistiller): the student, the training loop, resume, data, sharding, export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from afpq_jax._src.errors import InputError, QuantizationError
from afpq_jax._src.models import linear_paths
from afpq_jax._src.scheme import default_rules, resolve_rules
from afpq_jax._src.training import data as data_lib
from afpq_jax._src.training.student import clamp_to_ratios, export_student, make_student
from afpq_jax._src.training.trainer import QATConfig, train
from tests.support import FIXTURES, simulated_devices

# One xdist worker runs this file (--dist loadgroup): its module fixtures (the teacher and its
# self-generated data) are built once.
pytestmark = pytest.mark.xdist_group("test_qat")


@pytest.fixture(scope="module")
def teacher():
    return aq.load(FIXTURES / "llama_gqa")


def _layout(model, fmt="int2"):
    return resolve_rules(default_rules(aq.QuantScheme.create(fmt, group_size=32)), linear_paths(model.cfg))


@pytest.fixture(scope="module")
def data(teacher):
    prompts = np.random.default_rng(0).integers(0, teacher.cfg.vocab_size, (8, 2)).astype(np.int32)
    return data_lib.self_generated(teacher, prompts, new_tokens=15, batch_size=8, progress=False)


def test_clip_init_equals_clipped_rtn_and_export_equals_the_fake_quant_forward(teacher):
    cal = aq.Calibration(random=True, samples=2, seqlen=16, search_samples=2)
    layout = _layout(teacher, "nf3")
    clip = aq.ClipSearch(steps=4, step=0.1)  # a 4 x 4 grid: the same code path as the default 10 x 10, cheaper
    student, report = make_student(teacher, layout, windows=cal.windows(teacher.cfg.vocab_size, 64),
                                   calibration=cal, clip=clip, progress=False)
    assert "attn.q_proj" not in report["0"]["clipped"] and "mlp.down_proj" in report["0"]["clipped"]
    rtn = aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("nf3", group_size=32),
                                 method=aq.RTN(clip=clip), calibration=cal, progress=False)
    for path, layer in student.linear_layers().items():  # block 0 sees the same calibration inputs in both
        if path.startswith("layers.0."):
            np.testing.assert_array_equal(np.asarray(layer.train_scheme.fake_quant(layer.kernel.get_value())),
                                          np.asarray(rtn.linear_layers()[path].weight()))
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    packed = export_student(student)
    assert all(m.is_quantized for p, m in packed.linear_layers().items() if p in layout)
    np.testing.assert_array_equal(np.asarray(packed(ids)), np.asarray(student(ids)))


def test_clamping_equals_rtn_with_clip_ratios():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 8)).astype(np.float32)
    ratios = tuple(jnp.asarray(rng.uniform(0.6, 1.0, (3, 1, 8)).astype(np.float32)) for _ in range(2))
    want = aq.dequantize(aq.quantize(w, "nf3", group_size=32, clip_ratios=ratios))
    got = aq.fake_quant(clamp_to_ratios(jnp.asarray(w), 32, ratios), "nf3", group_size=32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_ste_gradients_reach_the_latent_kernels(teacher):
    student, _ = make_student(teacher, _layout(teacher), clip=None)
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)))(params)
    kernel = grads["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert float(jnp.abs(kernel).max()) > 0


def _history(result):
    return [h["loss"] for h in result.history]


def test_training_lowers_the_loss_and_exports(teacher, data, tmp_path):
    student, _ = make_student(teacher, _layout(teacher), clip=None)
    result = train(student, teacher, data, QATConfig(steps=12, batch_size=4, learning_rate=1e-3, eval_every=6),
                   eval_ids=data.reshape(-1), eval_seq_len=16, progress=False)
    loss = _history(result)
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3]), loss
    evals = [h["eval_perplexity"] for h in result.history if "eval_perplexity" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert 0 < result.gamma < 1
    packed = export_student(result.student)
    ids = jnp.asarray(data[:2])
    np.testing.assert_array_equal(np.asarray(packed(ids)), np.asarray(result.student(ids)))


def test_bf16_compute_trains_with_float32_master_weights(teacher, data):
    student, _ = make_student(teacher, _layout(teacher), clip=None)
    cfg = QATConfig(steps=2, batch_size=4, learning_rate=1e-3, gamma=0.3)
    f32 = train(student, teacher, data, cfg, progress=False)
    bf16 = train(student, teacher, data, QATConfig(**{**cfg.to_json(), "compute_dtype": "bfloat16"}),
                 progress=False)
    assert _history(bf16)[0] == pytest.approx(_history(f32)[0], rel=0.05)  # same start, bf16 rounding
    kernel = bf16.student.linear_layers()["layers.0.attn.q_proj"].kernel.get_value()
    assert kernel.dtype == jnp.float32  # master weights


def test_resume_is_bit_identical_and_checks_the_run(teacher, data, tmp_path):
    student, _ = make_student(teacher, _layout(teacher), clip=None)
    cfg = QATConfig(steps=4, batch_size=2, grad_accum=2, learning_rate=1e-3, checkpoint_every=2)
    whole = train(student, teacher, data, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    train(student, teacher, data, QATConfig(**{**cfg.to_json(), "steps": 2}), checkpoint_dir=tmp_path / "b",
          progress=False)  # an "interrupted" run: stops after step 2
    resumed = train(student, teacher, data, cfg, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert _history(resumed) == _history(whole)
    for a, b in zip(jax.tree.leaves(nnx.state(whole.student)), jax.tree.leaves(nnx.state(resumed.student))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InputError, match="another model"):
        train(student, teacher, data, QATConfig(**{**cfg.to_json(), "loss": "jsd"}),
              checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    with pytest.raises(InputError, match="already holds"):
        train(student, teacher, data, cfg, checkpoint_dir=tmp_path / "b", progress=False)


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint(teacher, data, tmp_path):
    student, _ = make_student(teacher, _layout(teacher), clip=None)
    with pytest.raises(QuantizationError, match="diverged") as e:
        train(student, teacher, data, QATConfig(steps=6, batch_size=2, learning_rate=1e30, checkpoint_every=1,
                                                loss="ce"), checkpoint_dir=tmp_path / "c", progress=False)
    from afpq_jax._src.training.trainer import TrainingCheckpoints
    saved = TrainingCheckpoints(tmp_path / "c").latest_step()  # the last finite state, not the diverged one
    assert saved is not None and f"last checkpoint is step {saved}" in str(e.value)


@pytest.mark.parametrize("bad,message", [({"loss": "mse"}, "unknown loss"), ({"gamma": 2.0}, "gamma"),
                                         ({"schedule": "step"}, "schedule"), ({"steps": 0}, "steps"),
                                         ({"compute_dtype": "float16"}, "compute_dtype")])
def test_bad_training_options(bad, message):
    with pytest.raises(InputError, match=message):
        QATConfig(**bad).validate()


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x80\x81abc")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("a prompt\n", encoding="utf-16")
    tok = lambda s, add_special_tokens=False: {"input_ids": [ord(c) for c in s]}  # noqa: E731
    with pytest.raises(InputError, match="no prompts"):
        data_lib.read_prompt_file(empty, tok)
    with pytest.raises(InputError, match="not UTF-8"):
        data_lib.read_prompt_file(binary, tok)
    with pytest.raises(InputError, match="is UTF-16 text"):
        data_lib.read_prompt_file(utf16, tok)


def test_self_generated_data_is_cached(teacher, tmp_path):
    prompts = np.random.default_rng(5).integers(0, teacher.cfg.vocab_size, (3, 2)).astype(np.int32)
    first = data_lib.self_generated(teacher, prompts, new_tokens=4, cache_dir=tmp_path, fingerprint="t",
                                    progress=False)
    files = list(tmp_path.glob("selfgen-*.npy"))
    assert first.shape == (3, 6) and len(files) == 1
    np.testing.assert_array_equal(first[:, :2], prompts)
    np.save(files[0], np.zeros_like(first))  # a second call reads the cache, not the teacher
    np.testing.assert_array_equal(data_lib.self_generated(teacher, prompts, new_tokens=4, cache_dir=tmp_path,
                                                          fingerprint="t", progress=False), 0)


SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax
    from pathlib import Path
    import afpq_jax as aq
    from afpq_jax._src.models import linear_paths
    from afpq_jax._src.scheme import default_rules, resolve_rules
    from afpq_jax._src.training.student import make_student
    from afpq_jax._src.training.trainer import QATConfig, train
    from flax import nnx
    teacher = aq.load(Path(sys.argv[1]))
    layout = resolve_rules(default_rules(aq.QuantScheme.create("int2", group_size=32)), linear_paths(teacher.cfg))
    data = np.random.default_rng(0).integers(0, teacher.cfg.vocab_size, (8, 9)).astype(np.int32)
    cfg = QATConfig(steps=2, batch_size=4, learning_rate=1e-3, gamma=0.4)
    out = []
    auto = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for mesh in (None, auto):
        student, _ = make_student(teacher, layout, clip=None)
        r = train(student, teacher, data, cfg, mesh=mesh, progress=False)
        out.append((r.history, jax.tree.leaves(nnx.state(r.student))))
    (h1, p1), (h2, p2) = out
    assert len(jax.devices()) == 4
    np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h2], rtol=1e-5)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_sharded_training_equals_unsharded():
    env = {**os.environ, "XLA_FLAGS": simulated_devices(4), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SHARDED, str(FIXTURES / "llama_gqa")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]

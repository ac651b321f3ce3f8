"""afpq_jax.qwix: AFPQ through qwix for models afpq-jax did not write (NNX, Linen), against numpy references."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import afpq_jax as aq
from afpq_jax.qwix import (AfpqRule, GptqCalibration, PackedWeight, PtqProvider, QatProvider, WeightLayout,
                           packed_weights, quantize_params, restore_state, save_state)
from tests.reference import ref_quantize

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from nnx_llama import Llama, LlamaConfig, hf_params  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, layers=2)
TOKENS = (jnp.arange(16).reshape(2, 8) * 7) % CFG.vocab_size
NF3 = aq.QuantScheme.create("nf3", group_size=48)  # K = 64: groups of 48 + a ragged 16
PROJ = AfpqRule(module_path=r".*_proj", scheme=NF3)


def _llama(seed: int = 0) -> Llama:
    return Llama(CFG, rngs=nnx.Rngs(seed))


def _ref_dequant(w2: np.ndarray, scheme: aq.QuantScheme) -> np.ndarray:
    return ref_quantize(np.asarray(w2, np.float32), scheme.format, scheme.group_size, scheme.asym)[0]


# The 2-D views written out by hand for the example model's kernels (independent of WeightLayout).
def _as_2d(name: str, w: np.ndarray) -> np.ndarray:
    return w.reshape(-1, w.shape[-1]) if name == "o_proj" else w.reshape(w.shape[0], -1)


def _reference_llama(model: Llama, scheme: aq.QuantScheme, layers=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj")):
    """A float copy of ``model`` whose matching kernels are numpy-reference dequantized."""
    ref = nnx.clone(model)
    for _, module in nnx.iter_modules(ref):
        for name in layers:
            sub = getattr(module, name, None)
            if isinstance(sub, (nnx.Einsum, nnx.Linear)):
                w = np.asarray(sub.kernel[...])
                sub.kernel[...] = jnp.asarray(_ref_dequant(_as_2d(name, w), scheme).reshape(w.shape), jnp.float32)
    return ref


# ---------------------------------------------------------------- layouts against numpy

@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_layout_round_trip_and_2d_view(shape, data):
    axes = data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))
    layout = WeightLayout(tuple(shape), tuple(sorted(axes)))
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kept = [a for a in range(len(shape)) if a not in axes]
    expect = np.transpose(w, sorted(axes) + kept).reshape(layout.k, layout.n)
    np.testing.assert_array_equal(np.asarray(layout.to_2d(jnp.asarray(w))), expect)
    np.testing.assert_array_equal(np.asarray(layout.from_2d(jnp.asarray(expect))), w)


@pytest.mark.parametrize("spec,xs,ws", [
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 2, 4)),
    ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 8)),
    ("...D,DF->...F", (2, 3, 8), (8, 5)),
    ("btd,fd->bft", (2, 3, 8), (5, 8)),       # weight stored (out, in); output transposed
    ("BTD,NDH->BNTH", (2, 3, 8), (2, 8, 4)),
])
def test_ptq_einsum_equals_numpy_on_dequantized_weight(spec, xs, ws):
    class Layer(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jax.random.normal(jax.random.key(1), ws))

        def __call__(self, x):
            return jnp.einsum(spec, x, self.w[...])

    x = jax.random.normal(jax.random.key(2), xs)
    layer = Layer()
    w = np.asarray(layer.w[...])
    scheme = aq.QuantScheme.create("int4", group_size=None)
    q = qwix.quantize_model(layer, PtqProvider([AfpqRule(scheme=scheme)]), x)
    pw = q.w
    assert isinstance(pw, PackedWeight)
    # the weight's 2-D view by hand: contracted axes (in the weight's order) x kept axes
    w_spec = spec.split("->")[0].split(",")[1]
    out_spec = spec.split("->")[1]
    contracted = [i for i, c in enumerate(w_spec) if c not in out_spec]
    kept = [i for i in range(len(ws)) if i not in contracted]
    w2 = np.transpose(w, contracted + kept).reshape(int(np.prod([ws[i] for i in contracted])), -1)
    dq = np.transpose(_ref_dequant(w2, scheme).reshape([ws[i] for i in contracted + kept]),
                      np.argsort(contracted + kept))
    np.testing.assert_allclose(np.asarray(q(x)), np.einsum(spec.replace("...", "Z"), np.asarray(x, np.float64)
                               .reshape(xs if "..." not in spec else (-1,) + xs[-1:]), dq).reshape(
                               np.asarray(q(x)).shape), rtol=2e-4, atol=2e-4)


def test_weights_with_batch_axes_are_declined_naming_the_layer():
    class Experts(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 8, 6)))

        def __call__(self, x):
            return jnp.einsum("EBD,EDF->EBF", x, self.w[...])

    with pytest.raises(aq.InputError, match="batch axes.*scheme is None"):
        qwix.quantize_model(Experts(), PtqProvider([AfpqRule(scheme=NF3)]), jnp.ones((4, 2, 8)))


# ---------------------------------------------------------------- the NNX decoder (bonsai style)

def test_ptq_logits_equal_the_reference_dequantized_model():
    model = _llama()
    q = qwix.quantize_model(model, PtqProvider([PROJ]), TOKENS)
    assert len(packed_weights(q)) == 7 * CFG.layers
    ref = _reference_llama(model, NF3)
    np.testing.assert_allclose(np.asarray(q(TOKENS)), np.asarray(ref(TOKENS)), rtol=1e-4, atol=1e-4)
    # and under nnx.jit
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(q, TOKENS)), np.asarray(q(TOKENS)),
                               rtol=1e-5, atol=1e-5)


def test_rules_pick_exactly_the_intended_layers():
    rules = [AfpqRule(module_path=r"layers/1/.*", scheme=None),
             AfpqRule(module_path=r".*mlp/(gate|up)_proj", scheme=NF3),
             AfpqRule(module_path=r".*attn/o_proj", scheme=aq.QuantScheme.create("int4", group_size=32))]
    q = qwix.quantize_model(_llama(), PtqProvider(rules), TOKENS)
    got = {p: str(w.scheme) for p, w in packed_weights(q).items()}
    assert got == {"layers/0/mlp/gate_proj/kernel": str(NF3), "layers/0/mlp/up_proj/kernel": str(NF3),
                   "layers/0/attn/o_proj/kernel": "int4-asym-g32"}
    assert isinstance(q.layers[1].mlp.up_proj.kernel, nnx.Param)
    assert isinstance(q.layers[0].attn.q_proj.kernel, nnx.Param)
    assert isinstance(q.embedder.embedding, nnx.Param)


def test_a_rule_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="matched no dot_general"):
        qwix.quantize_model(_llama(), PtqProvider([PROJ, AfpqRule(module_path="decoder/.*", scheme=NF3)]), TOKENS)


def test_quantize_params_equals_quantizing_in_the_forward_and_restore_is_exact(tmp_path):
    model = _llama()
    q = qwix.quantize_model(model, PtqProvider([PROJ]), TOKENS)
    abstract = nnx.eval_shape(lambda: qwix.quantize_model(_llama(5), PtqProvider([PROJ]), TOKENS))
    nnx.update(abstract, quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), abstract))
    for path, pw in packed_weights(q).items():
        other = packed_weights(abstract)[path]
        for a, b in zip(jax.tree.leaves(pw.qt), jax.tree.leaves(other.qt)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manifest = save_state(q, tmp_path / "state")
    # 3-bit codes plus fp16 s_pos and s_neg per group of 48 (the last one ragged) of each (K, N) view
    kn = [(w.layout.k, w.layout.n) for w in packed_weights(q).values()]
    expect = sum(3 * k * n + -(-k // 48) * n * 32 for k, n in kn) / sum(k * n for k, n in kn)
    assert manifest["packed"]["bits_per_weight"] == pytest.approx(expect)
    restored = restore_state(nnx.eval_shape(lambda: qwix.quantize_model(_llama(7), PtqProvider([PROJ]), TOKENS)),
                             tmp_path / "state")
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(q(TOKENS)))
    other_rules = [AfpqRule(module_path=r".*mlp/.*", scheme=NF3)]
    with pytest.raises(aq.CheckpointError, match="same rules"):
        restore_state(nnx.eval_shape(lambda: qwix.quantize_model(_llama(), PtqProvider(other_rules), TOKENS)),
                      tmp_path / "state")
    # same leaf shapes, another scheme: FP3 codes and scales look like NF3's (this restored without a word)
    for scheme, message in ((aq.QuantScheme.create("fp3", group_size=48), "was saved as"),
                            (aq.QuantScheme.create("nf3", group_size=48, scale_dtype="bfloat16"), "bfloat16")):
        rule = AfpqRule(module_path=PROJ.module_path, scheme=scheme)
        with pytest.raises(aq.CheckpointError, match=message):
            restore_state(nnx.eval_shape(lambda: qwix.quantize_model(_llama(), PtqProvider([rule]), TOKENS)),
                          tmp_path / "state")
    with pytest.raises(aq.InputError, match="exists"):
        save_state(q, tmp_path / "state")


def test_gptq_hessians_match_numpy_and_beat_rtn_on_them():
    model = _llama()
    rules = [AfpqRule(module_path=r"layers/0/mlp/down_proj", scheme=NF3)]
    cal = GptqCalibration(rules)
    cm = qwix.quantize_model(model, cal, TOKENS)  # this initializing call is not counted
    batches = [jax.random.randint(jax.random.key(i), (2, 12), 0, CFG.vocab_size) for i in range(3)]
    for b in batches:
        cm(b)

    def down_inputs(tokens):  # recomputed with the float model
        layer = model.layers[0]
        x = model.embedder(tokens)
        x = x + layer.attn(layer.input_layernorm(x))
        h = layer.post_attention_layernorm(x)
        return jax.nn.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)

    xs = np.concatenate([np.asarray(down_inputs(b), np.float64).reshape(-1, CFG.intermediate) for b in batches])
    (key,) = cal.hessians
    assert key == ("layers", 0, "mlp", "down_proj", "kernel")
    np.testing.assert_allclose(np.asarray(cal.hessians[key]), 2 * xs.T @ xs / len(xs), rtol=1e-4, atol=1e-5)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    w = np.asarray(model.layers[0].mlp.down_proj.kernel[...], np.float64)
    errors = {}
    for name, hessians in (("rtn", None), ("gptq", cal.hessians)):
        abstract = nnx.eval_shape(lambda: qwix.quantize_model(_llama(), PtqProvider(rules), TOKENS))
        nnx.update(abstract, quantize_params(params, abstract, hessians=hessians))
        wq = np.asarray(abstract.layers[0].mlp.down_proj.kernel.dequantize(), np.float64)
        errors[name] = float(np.mean((xs @ (w - wq)) ** 2))
    assert errors["gptq"] < 0.9 * errors["rtn"]
    with pytest.raises(aq.InputError, match="not quantized"):
        quantize_params(params, abstract, hessians={("layers", 1, "mlp", "up_proj", "kernel"): np.eye(64)})


# ---------------------------------------------------------------- QAT (qwix's getting-started MLP)

class MLP(nnx.Module):
    def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
        self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


def test_qat_gradient_is_the_straight_through_one_and_training_lowers_the_loss():
    scheme = aq.QuantScheme.create("fp4", group_size=16)
    x = jax.random.normal(jax.random.key(0), (32, 48))
    y = jax.random.normal(jax.random.key(1), (32, 8))
    model = MLP(48, 32, 8, rngs=nnx.Rngs(0))
    qat = qwix.quantize_model(model, QatProvider([AfpqRule(scheme=scheme)]), x)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    g = nnx.grad(loss)(qat)
    # STE: the gradient at W is the float model's gradient at fake_quant(W) (numpy-reference dequantized)
    ref = nnx.clone(model)
    for lin in (ref.linear1, ref.linear2):
        lin.kernel[...] = jnp.asarray(_ref_dequant(np.asarray(lin.kernel[...]), scheme), jnp.float32)
    g_ref = nnx.grad(loss)(ref)
    for name in ("linear1", "linear2"):
        np.testing.assert_allclose(np.asarray(getattr(g, name).kernel[...]),
                                   np.asarray(getattr(g_ref, name).kernel[...]), rtol=1e-3, atol=1e-5)
    opt = nnx.Optimizer(qat, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        value, grads = nnx.value_and_grad(loss)(m)
        opt.update(m, grads)
        return value

    losses = [float(step(qat, opt)) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]
    # the trained float weights then quantize with PTQ; the packed model computes what QAT trained
    ptq = qwix.quantize_model(qat, PtqProvider([AfpqRule(scheme=scheme)]), x)
    np.testing.assert_allclose(np.asarray(ptq(x)), np.asarray(qat(x)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Linen

class LinenBlock(nn.Module):
    heads: int = 2
    head_dim: int = 16

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
        a = jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k) / 4.0, axis=-1)
        o = nn.DenseGeneral(d, axis=(-2, -1), name="out")(jnp.einsum("bnqk,bknh->bqnh", a, v))
        x = x + o
        return x + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(2 * d, name="mlp_in")(x)))


def test_linen_block_ptq_equals_reference_save_restore_and_qat_trains(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    model = LinenBlock()
    params = model.init(jax.random.key(1), x)["params"]
    scheme = aq.QuantScheme.create("nf4", group_size=16)
    rules = [AfpqRule(module_path=r"(query|key|value|out|mlp_in|mlp_out)", scheme=scheme)]
    qmodel = qwix.quantize_model(model, PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(1), x)["params"]
    qparams = quantize_params(params, abstract)
    assert sorted(packed_weights(qparams)) == sorted(f"{n}/kernel" for n in ("query", "key", "value", "out",
                                                                            "mlp_in", "mlp_out"))
    ref = jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.asarray(_ref_dequant(np.asarray(w).reshape(-1, w.shape[-1]) if p[0].key == "out"
                                              else np.asarray(w).reshape(w.shape[0], -1), scheme).reshape(w.shape),
                                 jnp.float32) if p[-1].key == "kernel" else w, params)
    np.testing.assert_allclose(np.asarray(qmodel.apply({"params": qparams}, x)),
                               np.asarray(model.apply({"params": ref}, x)), rtol=1e-4, atol=1e-4)
    # init of the PTQ module packs its own random weights
    assert len(packed_weights(qmodel.init(jax.random.key(1), x)["params"])) == 6
    save_state(qparams, tmp_path / "linen")
    restored = restore_state(abstract, tmp_path / "linen")
    np.testing.assert_array_equal(np.asarray(qmodel.apply({"params": restored}, x)),
                                  np.asarray(qmodel.apply({"params": qparams}, x)))
    qat = qwix.quantize_model(model, QatProvider(rules))
    y = jnp.zeros_like(x)

    def loss(p):
        return jnp.mean((qat.apply({"params": p}, x) - y) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        updates, state = opt.update(g, state)
        return optax.apply_updates(p, updates), state, value

    p, state = params, opt.init(params)
    losses = []
    for _ in range(10):
        p, state, value = step(p, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- bad input

def test_bad_rules_and_versions_are_clear():
    with pytest.raises(aq.InputError, match="plain qwix rule"):
        PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int4")])
    with pytest.raises(aq.InputError, match="weight_qtype"):
        PtqProvider([AfpqRule(weight_qtype="int4", scheme=NF3)])
    with pytest.raises(aq.InputError, match="dynamic"):
        PtqProvider([AfpqRule(scheme=aq.QuantScheme.create("int4").with_activations(8, "static"))])
    with pytest.raises(aq.InputError, match="trains weights only"):
        QatProvider([AfpqRule(scheme=aq.QuantScheme.create("int4").with_activations(8, "dynamic"))])
    from afpq_jax._src.interop.qwix_compat import check_qwix_version
    with pytest.warns(UserWarning, match="tested with qwix"):
        check_qwix_version("0.0.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_qwix_version(qwix.__version__)


def test_transformed_or_foreign_traced_weights_are_refused_and_nothing_is_cached():
    class Matmul(nnx.Module):  # x @ w: dot_general runs inside jnp.matmul's own jit
        def __init__(self):
            self.w = nnx.Param(jax.random.normal(jax.random.key(1), (32, 32)))

        def __call__(self, x):
            return x @ self.w[...]

    class Transposed(Matmul):
        def __call__(self, x):
            return jnp.dot(x, self.w[...].T)

    x = jax.random.normal(jax.random.key(0), (3, 32))
    for provider in (PtqProvider, QatProvider):
        with pytest.raises(aq.InputError, match=r"Matmul: .*inside another jitted function.*jnp.dot"):
            qwix.quantize_model(Matmul(), provider([AfpqRule(scheme=NF3)]), x)
    with pytest.raises(aq.InputError, match=r"Transposed: .*transformed"):
        qwix.quantize_model(Transposed(), PtqProvider([AfpqRule(scheme=NF3)]), x)
    plain = Matmul()  # the refused trace left nothing behind in jnp.matmul's cache
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(x) @ np.asarray(plain.w[...]), rtol=1e-5,
                               atol=1e-5)


def test_dynamic_int8_activations_match_the_built_in_integer_path():
    scheme = aq.QuantScheme.create("int4", group_size=32).with_activations(8, "dynamic")
    x = jax.random.normal(jax.random.key(0), (4, 48))
    model = MLP(48, 64, 8, rngs=nnx.Rngs(0))
    q = qwix.quantize_model(model, PtqProvider([AfpqRule(module_path="linear1", scheme=scheme)]), x)
    qt = q.linear1.kernel.qt
    from afpq_jax.kernels import quantized_matmul_a8
    h = quantized_matmul_a8(x, qt, None) + model.linear1.bias[...]
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(model.linear2(nnx.relu(h))), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_through_qwix_packs_the_same_bits_as_the_built_in_rtn(real_hf_dir):
    import json
    cfg = LlamaConfig.from_hf(json.loads((real_hf_dir / "config.json").read_text()))
    cfg = LlamaConfig(**{**cfg.__dict__, "layers": 2})  # two blocks are enough to compare every projection kind
    scheme = aq.QuantScheme.create("nf3", group_size=128)
    abstract = nnx.eval_shape(lambda: qwix.quantize_model(Llama(cfg, rngs=nnx.Rngs(0)), PtqProvider(
        [AfpqRule(module_path=r"layers/[01]/.*_proj", scheme=scheme)]), jnp.zeros((1, 4), jnp.int32)))
    qp = quantize_params(hf_params(real_hf_dir, cfg), abstract)
    nnx.update(abstract, qp)
    ours = packed_weights(abstract)
    built_in = aq.quantize_pretrained(aq.load(real_hf_dir), [aq.QuantRule(r"layers\.[01]\..*", scheme)],
                                      method=aq.RTN(), progress=False)
    names = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "o_proj": "attn.o_proj",
             "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    layers = built_in.linear_layers()
    assert len(ours) == 14
    for path, pw in ours.items():
        _, i, _, name, _ = path.split("/")
        ref = layers[f"layers.{i}.{names[name]}"].quantized_tensor()
        for field in ("codes", "scale", "scale_neg"):
            np.testing.assert_array_equal(np.asarray(getattr(pw.qt, field)), np.asarray(getattr(ref, field)),
                                          err_msg=f"{path} {field}")

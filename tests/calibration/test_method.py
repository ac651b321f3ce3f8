"""The method protocol and registry: per-layer schemes through every method, methods registered from outside,
registry errors."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
import afpq_jax.calibration
from afpq_jax._src.algorithms import awq, clip, gptq
from afpq_jax._src.calibration import method as method_lib
from afpq_jax._src.models.transformer import block_linears
from tests.support import FIXTURES, FP3_SYM, INT4, MIXED, NF3, random_calibration, expected_layout


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn+clip"])
def test_every_method_searches_and_quantizes_each_layer_with_its_own_scheme(monkeypatch, method):
    seen: dict[str, set] = {"gptq": set(), "clip": set(), "awq": set()}
    real_gptq, real_clip, real_search = gptq.gptq_quantize, clip.clip_search, awq.search_scale

    def spy_gptq(kernel, h, fmt, **kw):
        seen["gptq"].add((kw["name"].split(".", 2)[2], fmt, kw["group_size"], kw["asym"]))
        return real_gptq(kernel, h, fmt, **kw)

    def spy_clip(kernel, x, fmt, **kw):
        seen["clip"].add((kernel.shape, fmt, kw["group_size"], kw["asym"]))
        return real_clip(kernel, x, fmt, **kw)

    def spy_search(block, group, x, positions, x_mean, schemes, *a, **kw):
        seen["awq"].add((group.layers, tuple(schemes)))
        return real_search(block, group, x, positions, x_mean, schemes, *a, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize", spy_gptq)
    monkeypatch.setattr(clip, "clip_search", spy_clip)
    monkeypatch.setattr(awq, "search_scale", spy_search)
    name, use_clip = method.split("+")[0], method.endswith("+clip") or None
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", MIXED, method=name, clip=use_clip,
                                   calibration=random_calibration(), progress=False)
    linears = model.linear_layers()
    want = expected_layout(linears)
    assert {p: m.scheme for p, m in linears.items() if m.is_quantized} == want
    if name == "gptq":
        assert seen["gptq"] == {(p.split(".", 2)[2], s.format, s.group_size, s.asym) for p, s in want.items()}
    else:  # the clip search ran on every quantized layer but q/k, each with its own scheme
        shapes = {(linears[p].in_features, linears[p].out_features) for p in want}
        assert seen["clip"] == {((linears[p].in_features, linears[p].out_features), s.format, s.group_size, s.asym)
                                for p, s in want.items() if not p.endswith(("q_proj", "k_proj"))}
        assert len(shapes) >= 3
    if name == "awq":  # o_proj is float, so its group (v_proj -> o_proj) is skipped; GQA has none anyway
        assert seen["awq"] == {(("attn.q_proj", "attn.k_proj", "attn.v_proj"), (NF3, NF3, NF3)),
                               (("mlp.gate_proj", "mlp.up_proj"), (FP3_SYM, FP3_SYM)),
                               (("mlp.down_proj",), (INT4,))}


# ---- the method registry ---------------------------------------------------------------------------------

def test_a_method_registered_from_outside_runs_through_the_driver_unchanged():
    @aq.calibration.register_method
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class HalfRange(aq.calibration.Method):
        """Test method: RTN with every group's range halved; reports the max |x| statistic it was given."""
        name: ClassVar[str] = "test-half-range"
        ratio: float = 0.5

        def statistics(self):
            return (aq.calibration.ABS_MAX,)

        def quantize_block(self, ctx):
            facts = {}
            for layer_name, scheme in ctx.schemes.items():
                layer = ctx.linears[layer_name]
                g = -(-layer.in_features // scheme.group_size)
                r = jnp.full((g, 1, layer.out_features), self.ratio, jnp.float32)
                layer.quantize(scheme, (r, r))
                facts[layer_name] = float(jnp.max(ctx.stats[layer_name]["abs_max"]))
            return facts

    try:
        assert "test-half-range" in aq.calibration.available_methods()
        calibration = random_calibration(n=4, seqlen=12)
        model = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="test-half-range",
                                       calibration=calibration, progress=False)
        record = json.loads(model.checkpoint_info.quantization)
        assert record["method"] == "test-half-range" and record["method_options"]["ratio"] == 0.5
        # block 0's q_proj input is input_norm(embed(ids)): compare the statistic with a direct computation
        float_model = aq.load(FIXTURES / "llama_gqa")
        x = float_model.layers[0].input_norm(float_model.embed_inputs(jnp.asarray(calibration.token_ids)))
        assert record["report"]["0"]["attn.q_proj"] == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6)
        # and block 0's layers were quantized the way the method says (its float kernels are the checkpoint's)
        for name, layer in block_linears(float_model.layers[0]).items():
            w = layer.kernel.get_value()
            r = jnp.full((-(-w.shape[0] // 32), 1, w.shape[1]), 0.5, jnp.float32)
            want = NF3.quantize(w, (r, r))
            np.testing.assert_array_equal(model.linear_layers()[f"layers.0.{name}"].quantized_tensor().codes,
                                          want.codes)
    finally:
        method_lib.METHODS.pop("test-half-range", None)


def test_method_registry_errors():
    with pytest.raises(aq.InputError, match="unknown method 'nope'"):
        aq.calibration.get_method("nope")
    with pytest.raises(aq.InputError, match="does not take these options"):
        aq.calibration.get_method("gptq", grid=3)
    with pytest.raises(aq.InputError, match="damp must be in"):
        aq.calibration.get_method("gptq", damp=2.0)
    with pytest.raises(ValueError, match="already registered"):
        @aq.calibration.register_method
        class Other(aq.calibration.Method):
            name = "gptq"

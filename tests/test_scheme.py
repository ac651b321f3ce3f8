"""`QuantScheme` and `QuantRule`: rules resolution, rules files (JSON), and scheme validation (integer scales, int8
activations)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantRule, QuantScheme
from afpq_jax import convert as convert_cli
from afpq_jax._src.errors import InputError
from tests.support import FIXTURES, FP3_SYM, INT4, MIXED, NF3, cli_error, expected_layout


def test_quant_scheme_is_canonical_and_valid_however_it_is_built():
    assert aq.QuantScheme(format="fp4") == aq.QuantScheme.create("fp4_e2m1")  # aliases become canonical names
    assert str(aq.QuantScheme(format="fp4", scale_dtype=jnp.bfloat16)) == "fp4_e2m1-asym-g128"
    assert type(aq.QuantScheme(format="nf3", group_size=np.int64(64)).group_size) is int  # JSON-serialisable
    assert type(aq.QuantScheme(format="int4", act_bits=np.int64(8), act_mode="dynamic").act_bits) is int
    for kwargs, message in [({"format": "bogus"}, "unknown format"), ({"format": "nf3", "group_size": 0}, "group_size"),
                            ({"format": "nf3", "scale_dtype": "foo"}, "scale_dtype"),
                            ({"format": "int4", "act_bits": 8.0, "act_mode": "dynamic"}, "act_bits"),
                            ({"format": "nf3", "asym": 1}, "asym")]:
        with pytest.raises(aq.InputError, match=message):
            aq.QuantScheme(**kwargs)


def test_scheme_json_keeps_old_checkpoints_and_round_trips():
    plain = aq.QuantScheme.create("int4")
    assert "integer_scales" not in plain.to_json()
    s = aq.QuantScheme.create("int4", integer_scales=True)
    assert aq.QuantScheme.from_json(s.to_json()) == s and str(s).endswith("-intscales")


@pytest.mark.parametrize("fmt,asym,message", [("nf4", True, "no integer group scales"),
                                              ("int8", True, "no integer group scales")])
def test_formats_without_integer_scales_are_refused(fmt, asym, message):
    with pytest.raises(InputError, match=message):
        aq.QuantScheme.create(fmt, asym=asym, integer_scales=True)
    with pytest.raises(InputError, match=message):
        aq.quantize(np.ones((8, 4), np.float32), fmt, asym=asym, integer_scales=True)


def test_nf_weights_have_no_integer_path():
    assert aq.formats.get_format("nf4").int8_multiplier() is None
    with pytest.raises(aq.InputError, match="no exact int8 representation"):
        aq.QuantScheme.create("nf4", act_bits=8, act_mode="dynamic")


# ---- rules -------------------------------------------------------------------------------------------------

def test_first_matching_rule_wins_none_keeps_float_and_patterns_match_whole_paths():
    paths = ["layers.0.attn.q_proj", "layers.0.attn.o_proj", "layers.0.mlp.down_proj", "layers.1.mlp.up_proj",
             "lm_head"]
    assert aq.resolve_rules(MIXED, paths) == {"layers.0.attn.q_proj": NF3, "layers.0.mlp.down_proj": INT4,
                                              "layers.1.mlp.up_proj": FP3_SYM}
    # order matters: the catch-all first takes everything, lm_head included
    assert aq.resolve_rules([QuantRule(".*", NF3), *MIXED], paths) == {p: NF3 for p in paths}
    assert aq.resolve_rules([QuantRule("q_proj", NF3)], paths) == {}  # fullmatch: no partial hits
    assert aq.resolve_rules([], paths) == {}
    assert aq.default_rules(NF3)[0] == QuantRule("lm_head", None)
    assert aq.resolve_rules(aq.default_rules(NF3, quantize_lm_head=True), paths)["lm_head"] == NF3


def test_rules_json_round_trip():
    text = json.dumps([r.to_json() for r in MIXED])
    assert aq.rules_from_json(json.loads(text)) == MIXED
    assert aq.rules_from_json({"rules": [{"pattern": ".*", "scheme": {"format": "fp4"}}]}) == [
        QuantRule(".*", QuantScheme.create("fp4_e2m1"))]


@pytest.mark.parametrize("content,message", [
    ([{"pattern": "layers\\.(\\d+", "scheme": {"format": "nf3"}}], "not a valid regular expression"),
    ([{"pattern": ".*", "scheme": {"format": "fp5"}}], "unknown format 'fp5'"),
    ([{"pattern": ".*", "scheme": {"format": "nf3", "groupsize": 64}}], "unknown scheme key(s) ['groupsize']"),
    ([{"pattern": ".*", "scheme": {"format": "nf3", "group_size": 0}}], "group_size must be a positive integer"),
    ([{"pattern": ".*"}], "rule 0: expected"),
    ({"pattern": ".*"}, "non-empty JSON list"),
    ("not json", "is not valid JSON"),
])
def test_bad_rules_files_give_one_line_errors(tmp_path, capsys, content, message):
    f = tmp_path / "rules.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "o"
    assert message in cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--rules", str(f), "--out",
                                          str(out), "--no-progress"])
    assert not out.exists()


def test_mixed_rules_end_to_end_through_convert_and_load(tmp_path):
    rules = tmp_path / "mixed.json"
    rules.write_text(json.dumps([r.to_json() for r in MIXED]))
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--rules", str(rules), "--out", str(out),
                             "--no-progress"]) == 0
    model = aq.load(out)
    linears = model.linear_layers()
    want = expected_layout(linears)
    assert {p: m.scheme for p, m in linears.items() if m.is_quantized} == want
    assert not linears["lm_head"].is_quantized and not linears["layers.1.attn.o_proj"].is_quantized
    qc = json.loads((out / "quantization_config.json").read_text())
    assert aq.rules_from_json(qc["rules"]) == MIXED and set(qc["layers"]) == set(want)
    float_model = aq.load(FIXTURES / "llama_gqa")
    for p, scheme in want.items():  # each layer holds exactly its own scheme's RTN
        ref = scheme.quantize(float_model.linear_layers()[p].kernel.get_value())
        np.testing.assert_array_equal(linears[p].quantized_tensor().codes, ref.codes)
        np.testing.assert_array_equal(linears[p].quantized_tensor().scale, ref.scale)
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    assert np.all(np.isfinite(np.asarray(model(ids))))

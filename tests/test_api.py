"""Public API: quantization rules, quantize_pretrained / save, the method registry, and the defects fixed with
them (GPTQ on a non-positive-definite Hessian, user errors vs bugs in the CLI, full-precision calibration math,
AWQ folds in bf16)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
import afpq_jax.calibration
from afpq_jax import QuantRule, QuantScheme
from afpq_jax import convert as convert_cli
from afpq_jax._src.algorithms import awq, clip, gptq
from afpq_jax._src.calibration import method as method_lib
from afpq_jax._src.models.transformer import block_linears

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
NF3 = QuantScheme.create("nf3", group_size=32)
INT4 = QuantScheme.create("int4", group_size=32)
FP3_SYM = QuantScheme.create("fp3", group_size=16, asym=False)
MIXED = [QuantRule(r"layers\.\d+\.mlp\.down_proj", INT4), QuantRule(r"layers\.\d+\.attn\.o_proj", None),
         QuantRule(r"layers\.\d+\.mlp\.(gate|up)_proj", FP3_SYM), QuantRule("lm_head", None), QuantRule(".*", NF3)]


def _expected_layout(paths):
    out = {}
    for p in paths:
        if p.endswith("down_proj"):
            out[p] = INT4
        elif p.endswith(("gate_proj", "up_proj")):
            out[p] = FP3_SYM
        elif p.endswith(("q_proj", "k_proj", "v_proj")):
            out[p] = NF3
    return out


def _calibration(vocab=256, n=4, seqlen=16, **kw):
    ids = np.random.default_rng(0).integers(0, vocab, (n, seqlen)).astype(np.int32)
    return aq.Calibration(token_ids=ids, batch_size=2, search_samples=2, **kw)


def _cli_error(capsys, argv) -> str:
    rc = convert_cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


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
    assert message in _cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--rules", str(f), "--out",
                                          str(out), "--no-progress"])
    assert not out.exists()


def test_rules_file_flag_conflicts_and_missing_file(tmp_path, capsys):
    base = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o")]
    assert "does not exist" in _cli_error(capsys, base + ["--rules", str(tmp_path / "nope.json")])
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"pattern": ".*", "scheme": {"format": "nf3"}}]))
    assert "--rules replaces --format" in _cli_error(capsys, base + ["--rules", str(f), "--format", "int4"])
    f.write_text(json.dumps([{"pattern": "q_proj", "scheme": {"format": "nf3"}}]))
    assert "the rules quantize no layer" in _cli_error(capsys, base + ["--rules", str(f)])


def test_mixed_rules_end_to_end_through_convert_and_load(tmp_path):
    rules = tmp_path / "mixed.json"
    rules.write_text(json.dumps([r.to_json() for r in MIXED]))
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--rules", str(rules), "--out", str(out),
                             "--no-progress"]) == 0
    model = aq.load(out)
    linears = model.linear_layers()
    want = _expected_layout(linears)
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
                                   calibration=_calibration(), progress=False)
    linears = model.linear_layers()
    want = _expected_layout(linears)
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


# ---- quantize_pretrained and save ----------------------------------------------------------------------

def _files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*")
            if f.is_file() and f.relative_to(d).parts[0] != "params"}


def _leaves(model):
    from flax import nnx
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_pretrained_and_save_write_what_the_cli_writes(tmp_path, method):
    src = FIXTURES / "llama_gqa"
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert convert_cli.main(["--model", str(src), "--format", "int3", "--group-size", "32", "--method", method,
                             "--calib-random", "--calib-samples", "4", "--calib-seqlen", "16", "--out",
                             str(cli_out), "--no-progress"]) == 0
    scheme = QuantScheme.create("int3", group_size=32)
    calibration = aq.Calibration(random=True, samples=4, seqlen=16) if method != "rtn" else None
    model = aq.quantize_pretrained(str(src), aq.default_rules(scheme), method=method, calibration=calibration,
                                   progress=False)
    assert aq.save(model, api_out) == api_out.absolute()
    cli_files, api_files = _files(cli_out), _files(api_out)
    assert cli_files.keys() == api_files.keys() and "quantization_config.json" in cli_files
    for name in cli_files:  # config, quantization config, tokenizer files: byte for byte
        assert cli_files[name] == api_files[name], name
    # orbax's data-file split depends on I/O timing; the stored arrays must be identical
    a, b = _leaves(aq.load(cli_out)), _leaves(aq.load(api_out))
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=str(p))


def test_configs_check_types_and_clip_accepts_a_bool(caplog):
    from afpq_jax._src.algorithms.clip import DEFAULT_SKIP
    assert aq.RTN(clip=True).clip == aq.ClipSearch() and aq.RTN(clip=False).clip is None  # True: AttributeError
    assert aq.AWQ(clip=False).clip is None
    assert aq.ClipSearch(skip=["attn.q_proj"]).skip == ("attn.q_proj",) and DEFAULT_SKIP == aq.ClipSearch().skip
    for make, exc, msg in [(lambda: aq.RTN(clip="yes"), TypeError, "ClipSearch"),
                           (lambda: aq.GPTQ(damp="0.1").validate(), aq.InputError, "damp"),
                           (lambda: aq.GPTQ(block_size=1.5).validate(), aq.InputError, "block_size"),
                           (lambda: aq.AWQ(grid=2.5).validate(), aq.InputError, "grid"),
                           (lambda: aq.Calibration(random=True, seed="a").validate(), aq.InputError, "seed"),
                           (lambda: aq.Calibration(token_ids=np.ones(64)).validate(), TypeError, "integer token"),
                           (lambda: aq.ActivationQuant(thresholds=(150,)).validate(), aq.InputError, "pair"),
                           (lambda: aq.QATConfig(steps=2.5).validate(), aq.InputError, "steps"),
                           (lambda: aq.SelfGeneratedData(samples=1.5).validate(), aq.InputError, "samples"),
                           (lambda: aq.ClipSearch(skip="attn.q_proj"), aq.InputError, "skip"),
                           (lambda: aq.quantize_pretrained(None, NF3), TypeError, "takes a path"),
                           (lambda: aq.load(FIXTURES / "llama_gqa", dtype="int8"), aq.InputError, "dtype")]:
        with pytest.raises(exc, match=msg):
            make()
    # a skip entry that names no layer is a warning (it silently clipped q_proj)
    with caplog.at_level("WARNING", logger="afpq_jax"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method=aq.RTN(clip=aq.ClipSearch(skip=("q_proj",))),
                               calibration=aq.Calibration(random=True, samples=2, seqlen=16), progress=False)
    assert "['q_proj'] name no layer" in caplog.text


def test_quantize_pretrained_from_an_in_memory_model(tmp_path):
    float_model = aq.load(FIXTURES / "llama_gqa")
    before = _leaves(float_model)
    q_mem = aq.quantize_pretrained(float_model, NF3, progress=False)
    q_path = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, progress=False)
    after = _leaves(float_model)
    assert all(np.array_equal(before[p], after[p]) for p in before)  # the input model is left unchanged
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    np.testing.assert_array_equal(np.asarray(q_mem(ids)), np.asarray(q_path(ids)))
    aq.save(q_mem, tmp_path / "q")  # the config came along from aq.load
    np.testing.assert_array_equal(np.asarray(aq.load(tmp_path / "q")(ids)), np.asarray(q_path(ids)))
    with pytest.raises(aq.CheckpointError, match="already has quantized layers"):
        aq.quantize_pretrained(q_mem, NF3, progress=False)
    # bfloat16: every kernel, lm_head included, is quantized from its bfloat16 value on both paths (lm_head was
    # quantized from the checkpoint's float32 on the path route: different codes, logits off by 0.2)
    rules = [aq.QuantRule(".*", aq.QuantScheme.create("nf4", group_size=32))]
    q_mem = aq.quantize_pretrained(aq.load(FIXTURES / "llama_gqa", dtype="bfloat16"), rules, progress=False)
    q_path = aq.quantize_pretrained(FIXTURES / "llama_gqa", rules, dtype="bfloat16", progress=False)
    assert q_path.linear_layers()["lm_head"].is_quantized
    for p, layer in q_path.linear_layers().items():
        np.testing.assert_array_equal(layer.quantized_tensor().codes, q_mem.linear_layers()[p].quantized_tensor().codes,
                                      err_msg=p)
    np.testing.assert_array_equal(np.asarray(q_mem(ids), np.float32), np.asarray(q_path(ids), np.float32))


def test_save_refuses_an_existing_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from afpq_jax._src import checkpoint
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, progress=False)
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        aq.save(model, out)

    def die(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write", die)
    with pytest.raises(OSError, match="disk full"):
        aq.save(model, tmp_path / "q2")
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_a_phase_timer_observes_phases_and_blocks():
    class Recorder(aq.calibration.PhaseTimer):
        def __init__(self):
            super().__init__()
            self.events = []

        def __call__(self, phase):
            self.events.append(phase)
            return super().__call__(phase)

        def block_done(self, index):
            self.events.append(index)

    timer = Recorder()
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", calibration=_calibration(),
                                   timer=timer, progress=False)
    assert timer.events == ["embed", "load block", "statistics", "gptq", "forward (quantized)", 0,
                            "load block", "statistics", "gptq", 1, "load outer"]
    assert dict(model.checkpoint_info.phase_seconds).keys() == {"embed", "load block", "statistics", "gptq",
                                                                 "forward (quantized)", "load outer", "total"}


def test_calibrated_methods_need_calibration_data():
    with pytest.raises(aq.InputError, match="needs calibration data"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", progress=False)
    with pytest.raises(aq.InputError, match="exactly one data source"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", progress=False,
                               calibration=aq.Calibration(random=True, text="x"))


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
        calibration = _calibration(n=4, seqlen=12)
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


# ---- defects fixed with this API -----------------------------------------------------------------------

def _indefinite_hessian(k: int, negative: float, seed: int = 0) -> np.ndarray:
    """A symmetric K x K matrix with eigenvalues ~U(0.5, 1.5) except one equal to ``negative``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    eig = rng.uniform(0.5, 1.5, k)
    eig[0] = negative
    return (q * eig) @ q.T


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_raises_damping_until_the_hessian_is_positive_definite(act_order):
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    h = _indefinite_hessian(32, -0.01)  # damp 0.01 x mean(diag) ~ 0.01 does not lift it; ~0.02 does
    assert np.isnan(np.asarray(gptq.hessian_inverse_factor(jnp.asarray(h, jnp.float32), 0.01))).any()
    qt = gptq.gptq_quantize(w, h, "int4", group_size=16, act_order=act_order)
    qt.validate()
    assert np.all(np.isfinite(np.asarray(aq.dequantize(qt))))
    # the first damping of the schedule (0.01 + k * 0.0025) that lifts the -0.01 eigenvalue is 0.0125
    assert np.linalg.eigvalsh(h + 0.0125 * np.mean(np.diag(h)) * np.eye(32)).min() > 2e-3
    want = gptq.gptq_quantize(w, h, "int4", group_size=16, act_order=act_order, damp=0.0125)
    np.testing.assert_array_equal(qt.codes, want.codes)
    np.testing.assert_array_equal(qt.scale, want.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_names_the_layer_when_no_damping_helps(act_order):
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    h = _indefinite_hessian(32, -5.0)
    with pytest.raises(aq.QuantizationError, match="layers.3.mlp.down_proj is not positive definite"):
        gptq.gptq_quantize(w, h, "nf3", group_size=16, act_order=act_order, name="layers.3.mlp.down_proj")


def test_damping_schedule():
    assert gptq.damping_schedule(0.01, 0.0025, 0.02) == pytest.approx([0.01, 0.0125, 0.015, 0.0175, 0.02])
    assert gptq.damping_schedule(0.5, 0.25, 1.0) == pytest.approx([0.5, 0.75, 1.0])


@pytest.mark.parametrize("exc", [KeyError, TypeError, RuntimeError])
def test_cli_lets_bugs_keep_their_traceback(tmp_path, monkeypatch, exc):
    def bug(*a, **kw):
        raise exc("internal")

    monkeypatch.setattr(aq, "quantize_pretrained", bug)
    with pytest.raises(exc):
        convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o"), "--no-progress"])


def test_cli_exit_codes_in_a_real_process(tmp_path):
    code = ("import sys, afpq_jax as aq\nfrom afpq_jax import convert\n"
            "def bug(*a, **k):\n    return {}['missing key']\n"
            "aq.quantize_pretrained = bug\n"
            f"sys.exit(convert.main(['--model', {str(FIXTURES / 'llama_gqa')!r}, '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'missing key'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--model", str(FIXTURES / "llama_gqa"),
                        "--out", str(tmp_path / "o"), "--format", "nf3", "--group-size", "none",
                        "--scale-dtype", "float16", "--method", "awq", "--damp", "0.1"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --damp applies to --method gptq"


def _dot_precisions(jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _dot_precisions(sub)
    return out


def _all_highest(fn, *args) -> int:
    precisions = _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert precisions and all(p == highest for p in precisions), precisions
    return len(precisions)


def test_calibration_math_asks_for_full_float32_precision():
    """TPU / GPU run default-precision float32 matmuls as bf16 passes / TF32; every matmul of GPTQ, the clip
    search and AWQ's search must ask for HIGHEST (on CPU the numbers are the same either way)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    h = jnp.asarray(_indefinite_hessian(64, 1.0), jnp.float32)
    fmt = aq.formats.get_format("nf3")
    perm, hinv, _ = gptq._factor(w, h, jnp.float32(0.01), bs=32, act_order=False)
    _all_highest(lambda w, h: gptq._gptq(w, h, perm, hinv, fmt=fmt, asym=True, g=16, sdt=jnp.float16,
                                         static=False, bs=32), w, h)
    x = jnp.asarray(rng.standard_normal((40, 64)), jnp.float32)
    grid = jnp.asarray(clip.shrink_grid(3), jnp.float32)
    _all_highest(lambda w, x: clip._search_separable(w, x, grid, fmt=fmt, g=16, sdt=jnp.float16, cols=8), w, x)
    pairs = jnp.stack([grid, grid], -1)
    _all_highest(lambda w, x: clip._search(w, x, pairs, fmt=aq.formats.get_format("int3"), asym=True, g=16,
                                           sdt=jnp.float16), w, x)
    from flax import nnx
    model = aq.load(FIXTURES / "llama_gqa")
    mlp = model.layers[0].mlp
    graphdef, state = nnx.split(mlp)
    xs = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    pos = jnp.zeros((1, 4), jnp.int32)
    refs = awq._outputs(graphdef, state, xs, pos, inspect="mlp")
    _all_highest(lambda s, xs: awq._outputs(graphdef, s, xs, pos, inspect="mlp"), state, xs)
    _all_highest(lambda s, xs: awq._search_losses(graphdef, s, xs, pos, jnp.ones(64), jnp.asarray([0.0, 0.5]), refs,
                                                  inspect="mlp", layer_paths=("gate_proj", "up_proj"),
                                                  schemes=(NF3, INT4)), state, xs)


def test_awq_fold_rounds_the_scale_once_in_bf16():
    model = aq.load(FIXTURES / "llama_gqa", dtype="bfloat16")
    block = model.layers[0]
    group = [g for g in awq.scaling_groups(model.cfg) if g.prev == "post_attn_norm"][0]
    s = jnp.asarray(np.random.default_rng(0).uniform(0.3, 3.0, model.cfg.hidden_size), jnp.float32)
    s_used = s.astype(jnp.bfloat16).astype(jnp.float32)
    assert not np.array_equal(np.asarray(s_used), np.asarray(s))  # the scale is not bf16-exact
    kernels = {n: awq.get_path(block, n).kernel.get_value() for n in group.layers}
    norm = block.post_attn_norm.weight.get_value()
    np.testing.assert_array_equal(np.asarray(awq.fold_scale(block, group, s)), np.asarray(s_used))
    for n, k in kernels.items():
        got = awq.get_path(block, n).kernel.get_value()
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray((k.astype(jnp.float32) * s_used[:, None]).astype(jnp.bfloat16),
                                                 np.float32))
    got = block.post_attn_norm.weight.get_value()
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray((norm.astype(jnp.float32) / s_used).astype(jnp.bfloat16), np.float32))


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
                 "afpq_jax.kernels", "afpq_jax.eval", "afpq_jax.assets", "afpq_jax.memory", "afpq_jax.qwix",
                 "pallas_kernels"):
        module = importlib.import_module(name)
        for public in module.__all__:
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

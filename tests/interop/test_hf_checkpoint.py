"""Whole models out to compressed-tensors / GPTQ / the afpq layout and back in (`afpq_jax.export`, `aq.load`):
exported then imported gives the same logits bit for bit; the files follow each format's layout, checked by
numpy decoders written from the specs (tests/interop/test_compressed_tensors.py, test_gptq.py); refusals."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import afpq_jax as aq
from afpq_jax import export as export_cli
from afpq_jax._src.errors import CheckpointError, NotExportable
from afpq_jax._src.io.safetensors_io import SafetensorsFile
from tests.interop.test_compressed_tensors import _decode as ct_reference
from tests.interop.test_gptq import _ref_gptq as gptq_reference
from tests.support import FIXTURES, logits

IDS = jnp.asarray(np.arange(40).reshape(2, 20) * 7 % 256)
INT4 = aq.QuantScheme.create("int4", group_size=16, asym=True)


def _quantized(rules, fixture="llama_gqa"):
    return aq.quantize_pretrained(FIXTURES / fixture, rules, progress=False)


def _same_logits(model, path):
    back = aq.load(path)
    np.testing.assert_array_equal(logits(back, IDS), logits(model, IDS))
    return back


CASES = [("compressed-tensors", INT4), ("compressed-tensors", aq.QuantScheme.create("int8", group_size=None,
                                                                                     asym=False)),
         ("compressed-tensors", aq.QuantScheme.preset("nvfp4")), ("compressed-tensors", aq.QuantScheme.preset("mxfp4")),
         ("gptq", aq.QuantScheme.create("int4", group_size=32, asym=False)),
         ("gptq", aq.QuantScheme.create("int3", group_size=32, asym=True)),
         ("afpq", aq.QuantScheme.create("nf3", group_size=16, asym=True)),
         ("afpq", aq.QuantScheme.preset("nvfp4", asym=True)),
         ("afpq", aq.QuantScheme.create("int4", group_size=32, integer_scales=True))]


@pytest.mark.parametrize("target,scheme", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_exported_then_imported_gives_identical_logits(tmp_path, target, scheme):
    model = _quantized(scheme)
    result = export_cli.export(model, tmp_path / "out", format=target)
    assert result.shards == ("model.safetensors",) and not result.dequantized
    back = _same_logits(model, tmp_path / "out")
    layer = back.layers[1].mlp.down_proj
    assert layer.is_quantized and layer.scheme.format == scheme.format
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == {"compressed-tensors": "compressed-tensors", "gptq": "gptq",
                                                          "afpq": "afpq"}[target]


def test_compressed_tensors_files_decode_with_the_reference(tmp_path):
    model = _quantized(INT4)
    export_cli.export(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    (group,) = cfg["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16, "dynamic": False,
        "actorder": None}
    tensors = load_file(tmp_path / "ct" / "model.safetensors")  # the safetensors package reads the file
    assert "lm_head.weight" in tensors and "model.layers.0.self_attn.q_proj.weight" not in tensors
    for path, layer in model.linear_layers().items():
        if not layer.is_quantized:
            continue
        name = {"attn": "self_attn"}.get(path.split(".")[2], "mlp")
        prefix = f"model.layers.{path.split('.')[1]}.{name}.{path.split('.')[3]}"
        got = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        assert set(got) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
        np.testing.assert_array_equal(ct_reference(got, group["weights"]),
                                      np.asarray(layer.weight(), np.float64).T, err_msg=path)


def test_gptq_files_decode_with_the_reference(tmp_path):
    model = _quantized(aq.QuantScheme.create("int4", group_size=32, asym=False))
    export_cli.export(model, tmp_path / "g", format="gptq", dtype="float16")
    qc = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (4, 32, True, "gptq")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"] == qc
    tensors = load_file(tmp_path / "g" / "model.safetensors")
    assert tensors["model.norm.weight"].dtype == np.float16
    layer = model.layers[0].mlp.up_proj
    got = {s: tensors[f"model.layers.0.mlp.up_proj.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
    np.testing.assert_array_equal(gptq_reference(got, 4, 32, "gptq"), np.asarray(layer.weight()).T)


def test_mixed_schemes_write_mixed_precision_and_gptq_dynamic(tmp_path):
    rules = [aq.QuantRule(pattern=r".*\.attn\..*", scheme=aq.QuantScheme.preset("nvfp4")),
             aq.QuantRule(pattern=r"layers\.1\.mlp\.down_proj", scheme=None),
             aq.QuantRule(pattern=r".*", scheme=INT4)]
    model = _quantized(rules)
    export_cli.export(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mixed-precision"
    formats = {g["format"]: g["targets"] for g in cfg["config_groups"].values()}
    assert set(formats) == {"nvfp4-pack-quantized", "pack-quantized"}
    assert "model.layers.0.self_attn.q_proj" in formats["nvfp4-pack-quantized"]
    assert "model.layers.1.mlp.down_proj" in cfg["ignore"]
    _same_logits(model, tmp_path / "ct")

    rules = [aq.QuantRule(pattern=r".*\.attn\.q_proj", scheme=aq.QuantScheme.create("int8", group_size=32, asym=False)),
             aq.QuantRule(pattern=r"layers\.1\.mlp\.down_proj", scheme=None),
             aq.QuantRule(pattern=r".*", scheme=aq.QuantScheme.create("int4", group_size=32, asym=False))]
    model = _quantized(rules)
    export_cli.export(model, tmp_path / "g", format="gptq")
    qc = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["dynamic"][r"+:^model\.layers\.0\.self_attn\.q_proj$"]["bits"] == 8
    assert r"-:^model\.layers\.1\.mlp\.down_proj$" in qc["dynamic"]
    _same_logits(model, tmp_path / "g")
    # q/k/v alike: one rule that also names vLLM's fused qkv_proj
    model = _quantized([aq.QuantRule(pattern=r".*\.attn\.[qkv]_proj", scheme=aq.QuantScheme.create(
        "int8", group_size=32, asym=False)), aq.QuantRule(pattern=r".*", scheme=aq.QuantScheme.create(
            "int4", group_size=32, asym=False))])
    result = export_cli.export(model, tmp_path / "g2", format="gptq")
    qc = json.loads((tmp_path / "g2" / "quantize_config.json").read_text())
    assert qc["dynamic"] == {rf"+:^model\.layers\.{i}\.self_attn\.(k_proj|q_proj|qkv_proj|v_proj)$":
                             {"bits": 8, "group_size": 32, "sym": True} for i in (0, 1)}
    assert result.warnings == ()
    _same_logits(model, tmp_path / "g2")


def test_layers_a_format_cannot_hold_are_refused_or_dequantized(tmp_path):
    rules = [aq.QuantRule(pattern=r"layers\.0\..*", scheme=aq.QuantScheme.create("nf3", group_size=16)),
             aq.QuantRule(pattern=r".*", scheme=INT4)]
    model = _quantized(rules)
    with pytest.raises(NotExportable, match=r"compressed-tensors cannot hold 7 layer\(s\) exactly .*nf3.*"
                                            r"layers\.0\.attn\.q_proj"):
        export_cli.export(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    result = export_cli.export(model, tmp_path / "ct", dequantize_unsupported=True)
    assert len(result.dequantized) == 7 and result.dequantized[0] == "layers.0.attn.q_proj"
    header = SafetensorsFile(tmp_path / "ct" / "model.safetensors").entries
    assert header["model.layers.0.self_attn.q_proj.weight"][0].name == "bfloat16"
    assert "model.layers.0.self_attn.q_proj.weight_packed" not in header
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in cfg["ignore"]
    back = aq.load(tmp_path / "ct")
    assert not back.layers[0].attn.q_proj.is_quantized and back.layers[1].attn.q_proj.is_quantized
    np.testing.assert_array_equal(np.asarray(back.layers[0].attn.q_proj.weight()),
                                  np.asarray(model.layers[0].attn.q_proj.weight().astype(jnp.bfloat16), np.float32))
    with pytest.raises(NotExportable, match="GPTQ checkpoints are weight-only|gptq cannot hold"):
        export_cli.export(_quantized(aq.QuantScheme.create("fp4_e2m1", group_size=16)), tmp_path / "g",
                          format="gptq")
    with pytest.raises(aq.InputError, match="no layer"):
        export_cli.export(aq.load(FIXTURES / "llama_gqa"), tmp_path / "f")
    cal = aq.Calibration(random=True, samples=4, seqlen=16, batch_size=4, search_batch_size=4)
    bloom_awq = aq.quantize_pretrained(FIXTURES / "bloom", INT4, method="awq", calibration=cal, progress=False)
    with pytest.raises(NotExportable, match=r"no place for \(layers\.0\.mlp\.act_scale"):
        export_cli.export(bloom_awq, tmp_path / "b", format="afpq")


def test_shards_index_and_bloom_names(tmp_path):
    model = _quantized(INT4, "bloom")
    result = export_cli.export(model, tmp_path / "b", max_shard_bytes=40_000)
    assert len(result.shards) > 2 and result.shards[0] == f"model-00001-of-{len(result.shards):05d}.safetensors"
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    assert "transformer.h.0.self_attention.query_key_value.weight_packed" in index["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings
    assert index["metadata"]["total_size"] == sum(
        (tmp_path / "b" / s).stat().st_size for s in result.shards) - sum(
        8 + int.from_bytes((tmp_path / "b" / s).read_bytes()[:8], "little") for s in result.shards)
    _same_logits(model, tmp_path / "b")


@pytest.mark.parametrize("fixture,target", [("gemma3", "compressed-tensors"), ("qwen3", "gptq")])
def test_other_families_travel_under_their_hf_names(tmp_path, fixture, target):
    """Gemma 3's four norms and q/k norms and Qwen3's q/k norms go out under transformers' names and come back
    to the same logits."""
    model = _quantized(INT4, fixture)
    export_cli.export(model, tmp_path / "out", format=target)
    ids = jnp.asarray(np.load(FIXTURES / fixture / "reference.npz")["input_ids"])
    back = aq.load(tmp_path / "out")
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))
    names = SafetensorsFile(tmp_path / "out" / "model.safetensors").keys()
    assert "model.layers.0.self_attn.k_norm.weight" in names
    if fixture == "gemma3":
        assert {"model.layers.2.pre_feedforward_layernorm.weight", "model.layers.2.post_feedforward_layernorm.weight",
                "model.layers.2.mlp.gate_proj.weight_packed"} <= set(names)


def test_static_int8_activations_travel_with_their_input_scale(tmp_path):
    model = _quantized(aq.QuantScheme.create("int4", group_size=32, asym=False))
    model.layers[0].mlp.up_proj.set_activation_quant(8, "static", input_scale=0.05)
    model.layers[1].mlp.up_proj.set_activation_quant(8, "dynamic")
    export_cli.export(model, tmp_path / "afpq", format="afpq")
    back = _same_logits(model, tmp_path / "afpq")
    assert back.layers[0].mlp.up_proj.scheme.act_mode == "static"
    assert float(back.layers[0].mlp.up_proj.input_scale.get_value()) == np.float32(0.05)
    assert back.layers[1].mlp.up_proj.scheme.act_mode == "dynamic"
    with pytest.raises(NotExportable, match="weight-only"):
        export_cli.export(model, tmp_path / "g", format="gptq")
    # vLLM serves W·A8 compressed-tensors with dynamic per-token activations only: static ones are refused
    with pytest.raises(NotExportable, match=r"static int8 activations on int4 weights.*layers\.0\.mlp\.up_proj"):
        export_cli.export(model, tmp_path / "ct")
    model.layers[0].mlp.up_proj.set_activation_quant(8, "dynamic")
    result = export_cli.export(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = [g["input_activations"] for g in cfg["config_groups"].values() if g["input_activations"]]
    assert acts == [{"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                     "group_size": None, "actorder": None}]
    assert any("gate_up_proj: its layers have different schemes" in w for w in result.warnings)
    back = _same_logits(model, tmp_path / "ct")
    assert back.layers[0].mlp.up_proj.scheme.act_mode == "dynamic"


def test_config_rules_follow_the_readers_precedence():
    """compressed-tensors: a module's own name beats a pattern, which beats "Linear", whatever the groups' order;
    GPTQ's dynamic rules: the first match decides (GPTQModel, vLLM)."""
    from afpq_jax._src.interop import hf_import
    qc = {"config_groups": {"a": {"targets": ["Linear"], "weights": {"n": 1}},
                            "b": {"targets": ["re:.*q_proj$"], "weights": {"n": 2}},
                            "c": {"targets": ["model.layers.0.self_attn.q_proj"], "weights": {"n": 3}}},
          "format": "pack-quantized"}
    assert hf_import._ct_group("model.layers.0.self_attn.q_proj", qc)[0] == {"n": 3}
    assert hf_import._ct_group("model.layers.1.self_attn.q_proj", qc)[0] == {"n": 2}
    assert hf_import._ct_group("model.layers.1.mlp.up_proj", qc)[0] == {"n": 1}
    qc = {"bits": 4, "group_size": 128, "sym": True,
          "dynamic": {r"-:.*\.0\.mlp\..*": {}, r"+:.*mlp.*": {"bits": 8}, r"+:.*up_proj": {"group_size": 32}}}
    assert hf_import._gptq_args("model.layers.0.mlp.up_proj", qc) is None
    assert hf_import._gptq_args("model.layers.1.mlp.up_proj", qc) == {"bits": 8, "group_size": 128, "sym": True}


def test_export_cli(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    aq.save(_quantized(INT4), ckpt)
    out = tmp_path / "out"
    assert export_cli.main(["--model", str(ckpt), "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "compressed-tensors" and summary["shards"] == ["model.safetensors"]
    assert export_cli.main(["--model", str(ckpt), "--out", str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert export_cli.main(["--model", str(ckpt), "--out", str(out), "--format", "afpq", "--overwrite",
                            "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "afpq"
    # between outside formats: the imported afpq directory to GPTQ (asymmetric INT4: gptq_v2)
    assert export_cli.main(["--model", str(out), "--out", str(tmp_path / "g"), "--format", "gptq",
                            "--no-progress"]) == 0
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    _same_logits(aq.load(ckpt), tmp_path / "g")
    nf3 = tmp_path / "nf3"
    aq.save(_quantized(aq.QuantScheme.create("nf3", group_size=16)), nf3)
    assert export_cli.main(["--model", str(nf3), "--out", str(tmp_path / "x"), "--format", "gptq",
                            "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gptq cannot hold 14 layer(s) exactly") and "--dequantize-unsupported" in err
    assert not (tmp_path / "x").exists()


def test_unreadable_quantization_configs_are_one_line_errors(tmp_path):
    export_cli.export(_quantized(INT4), tmp_path / "ct")
    cfg_path = tmp_path / "ct" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["quant_method"] = "fp8"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'fp8' is not readable"):
        aq.load(tmp_path / "ct")
    cfg["quantization_config"] = {**cfg["quantization_config"], "quant_method": "compressed-tensors",
                                  "config_groups": {}}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no config group targets it"):
        aq.load(tmp_path / "ct")


def test_act_order_gptq_checkpoints_load_packed_and_travel_on(tmp_path):
    """A desc_act GPTQ layer (g_idx scattering each group over the input, every group its own scale) loads as rows
    stored in group order plus the permutation the layer gathers its input by: its weight, in the input's order, is
    what the reference GPTQ decoder computes, and so is its output. Exported again it gives back the same tensors
    (GPTQ) or the same logits (afpq); compressed-tensors (whose current releases refuse actorder 'group') refuses."""
    model = _quantized(aq.QuantScheme.create("int4", group_size=32, asym=False))
    export_cli.export(model, tmp_path / "static", format="gptq")
    tensors = load_file(tmp_path / "static" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # in = 160: five groups of 32, each with its own scales
    g_idx = (np.random.default_rng(0).permutation(160) // 32).astype(np.int32)
    layer_tensors = {s: tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales")} | {"g_idx": g_idx}
    want = gptq_reference(layer_tensors, 4, 32, "gptq", static=False)  # (out, in), the GPTQ loaders' weight
    ordered = tmp_path / "ordered"
    ordered.mkdir()
    for f in ("config.json", "quantize_config.json"):
        (ordered / f).write_text((tmp_path / "static" / f).read_text())
    save_file({**tensors, f"{name}.g_idx": g_idx}, ordered / "model.safetensors", metadata={"format": "pt"})

    act = aq.load(ordered)
    layer = act.layers[0].mlp.down_proj
    assert layer.scheme.act_order_groups and str(layer.scheme).endswith("-actorder")
    perm = np.asarray(layer.input_perm.get_value())
    assert np.array_equal(g_idx[perm], np.arange(160) // 32)
    np.testing.assert_array_equal(np.asarray(layer.weight()), want.T)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 160)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ want.T, rtol=1e-5, atol=1e-5)

    export_cli.export(act, tmp_path / "again", format="gptq")
    again = load_file(tmp_path / "again" / "model.safetensors")
    for suffix, value in layer_tensors.items():
        np.testing.assert_array_equal(again[f"{name}.{suffix}"], value, err_msg=suffix)
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["desc_act"] is True
    _same_logits(act, tmp_path / "again")
    export_cli.export(act, tmp_path / "afpq", format="afpq")
    assert _same_logits(act, tmp_path / "afpq").layers[0].mlp.down_proj.scheme.act_order_groups
    with pytest.raises(NotExportable, match="activation-order groups"):
        export_cli.export(act, tmp_path / "ct")
    aq.save(act, tmp_path / "ckpt")  # and as an afpq-jax checkpoint (orbax), permutation included
    assert _same_logits(act, tmp_path / "ckpt").layers[0].mlp.down_proj.scheme.act_order_groups

def test_awq_gemm_checkpoints_load_packed(tmp_path):
    """An AutoAWQ GEMM directory (qweight/qzeros in AWQ's interleaved order, fp16 scales) loads with its int4
    layers as stored: the same logits as the model whose layers it holds."""
    from afpq_jax._src.interop import gptq
    model = _quantized(aq.QuantScheme.create("int4", group_size=32, asym=True))
    export_cli.export(model, tmp_path / "ct")  # for the float tensors and config.json
    tensors = {k: v for k, v in load_file(tmp_path / "ct" / "model.safetensors").items()
               if not k.rpartition(".")[2].startswith("weight_") or k.endswith("norm.weight")}
    for path, layer in model.linear_layers().items():
        if layer.is_quantized:
            i, kind, proj = path.split(".")[1:]
            prefix = f"model.layers.{i}.{'self_attn' if kind == 'attn' else 'mlp'}.{proj}"
            tensors.update({f"{prefix}.{k}": v for k, v in gptq.encode_awq_layer(layer.quantized_tensor()).items()})
    awq = tmp_path / "awq"
    awq.mkdir()
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                  "version": "gemm"}
    (awq / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, awq / "model.safetensors")
    back = _same_logits(model, awq)
    assert back.layers[0].mlp.up_proj.scheme == aq.QuantScheme.create("int4", group_size=32, asym=True)
    cfg["quantization_config"]["version"] = "gemv"
    (awq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="reads 4-bit GEMM"):
        aq.load(awq)


def _edit_config(directory, edit):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


def test_imports_refuse_what_the_config_does_not_describe(tmp_path):
    """Tensors the config gives no place (a zero point under a symmetric scheme), quantized layers the config
    ignores, and malformed config values are one-line `CheckpointError`s, never silently other weights."""
    model = _quantized(INT4)
    export_cli.export(model, tmp_path / "afpq", format="afpq")
    _edit_config(tmp_path / "afpq", lambda qc: qc["layers"]["model.layers.0.mlp.up_proj"].update(asym=False))
    with pytest.raises(CheckpointError, match=r"up_proj: tensor\(s\) weight_zero_point do not belong"):
        aq.load(tmp_path / "afpq")
    export_cli.export(model, tmp_path / "ct")
    _edit_config(tmp_path / "ct", lambda qc: qc["ignore"].append("re:.*up_proj$"))
    with pytest.raises(CheckpointError, match="up_proj is in quantization_config.ignore but has quantized tensors"):
        aq.load(tmp_path / "ct")
    _edit_config(tmp_path / "ct", lambda qc: qc.update(ignore=["lm_head"], config_groups=[]))
    with pytest.raises(CheckpointError, match="config_groups must be an object, got an array"):
        aq.load(tmp_path / "ct")
    export_cli.export(_quantized(aq.QuantScheme.create("int4", group_size=32, asym=False)), tmp_path / "g",
                      format="gptq")
    for edit, match in ((lambda qc: qc.update(dynamic=[]), "dynamic must be an object, got an array"),
                        (lambda qc: qc.update(dynamic={"+:(": {}}), "is not a regular expression"),
                        (lambda qc: qc.update(bits="4"), "bits must be an integer, got a string")):
        _edit_config(tmp_path / "g", edit)
        with pytest.raises(CheckpointError, match=match):
            aq.load(tmp_path / "g")
    with pytest.raises(CheckpointError, match="already quantized"):
        aq.quantize_pretrained(tmp_path / "ct", INT4, progress=False)


def test_tied_lm_head_is_listed_as_ignored():
    """A tied lm_head is a float Linear to the readers: compressed-tensors' `ignore` names it (llm-compressor does)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        export_cli.export(_quantized(INT4, "bloom"), Path(d) / "b")
        assert json.loads((Path(d) / "b" / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


def test_the_readme_export_commands_parse():
    import shlex
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = [line.split("#")[0] for line in readme.splitlines() if line.startswith("python -m afpq_jax.export ")]
    assert len(lines) >= 4
    for line in lines:
        args = export_cli.build_parser().parse_args(shlex.split(line)[3:])
        assert args.format in export_cli.TARGETS

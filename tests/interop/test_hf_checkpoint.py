"""Whole models out to compressed-tensors / GPTQ / the afpq layout and back in (`afpq_jax.export`, `aq.load`):
exported then imported gives the same logits bit for bit; the files follow each format's layout, checked by
numpy decoders written from the specs (tests/interop/test_compressed_tensors.py, test_gptq.py); refusals."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import afpq_jax as aq
from afpq_jax import export as export_cli
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.interop.compressed_tensors import NotExportable
from afpq_jax._src.io.safetensors_io import SafetensorsFile
from tests.interop.test_compressed_tensors import _decode as ct_reference
from tests.interop.test_gptq import _ref_gptq as gptq_reference
from tests.support import FIXTURES

IDS = jnp.asarray(np.arange(40).reshape(2, 20) * 7 % 256)
INT4 = aq.QuantScheme.create("int4", group_size=16, asym=True)


def _quantized(rules, fixture="llama_gqa"):
    return aq.quantize_pretrained(FIXTURES / fixture, rules, progress=False)


def _same_logits(model, path):
    back = aq.load(path)
    np.testing.assert_array_equal(np.asarray(back(IDS)), np.asarray(model(IDS)))
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
    """A desc_act GPTQ layer (g_idx scattering each group over the input) loads as rows stored in group order plus
    the permutation the layer gathers its input by; exported again it gives back the same tensors (GPTQ) or a
    weight_g_idx (compressed-tensors), and the model the same logits."""
    model = _quantized(aq.QuantScheme.create("int4", group_size=32, asym=False))
    export_cli.export(model, tmp_path / "static", format="gptq")
    tensors = load_file(tmp_path / "static" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # in = 160: five groups of 32
    # one scale and zero point for every group, so any assignment of rows to groups is the same weight
    tensors[f"{name}.scales"] = np.repeat(tensors[f"{name}.scales"][:1], 5, axis=0)
    save_file(tensors, tmp_path / "static" / "model.safetensors", metadata={"format": "pt"})
    ordered = tmp_path / "ordered"
    ordered.mkdir()
    for f in ("config.json", "quantize_config.json"):
        (ordered / f).write_text((tmp_path / "static" / f).read_text())
    g_idx = (np.random.default_rng(0).permutation(160) // 32).astype(np.int32)
    save_file({**tensors, f"{name}.g_idx": g_idx}, ordered / "model.safetensors", metadata={"format": "pt"})

    plain, act = aq.load(tmp_path / "static"), aq.load(ordered)
    layer = act.layers[0].mlp.down_proj
    assert layer.scheme.act_order_groups and not plain.layers[0].mlp.down_proj.scheme.act_order_groups
    perm = np.asarray(layer.input_perm.get_value())
    assert np.array_equal(g_idx[perm], np.arange(160) // 32)
    np.testing.assert_array_equal(np.asarray(layer.weight()), np.asarray(plain.layers[0].mlp.down_proj.weight()))
    np.testing.assert_allclose(np.asarray(act(IDS)), np.asarray(plain(IDS)), rtol=1e-5, atol=1e-5)

    export_cli.export(act, tmp_path / "again", format="gptq")
    again = load_file(tmp_path / "again" / "model.safetensors")
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        np.testing.assert_array_equal(again[f"{name}.{suffix}"], tensors.get(f"{name}.{suffix}", g_idx)
                                      if suffix != "g_idx" else g_idx, err_msg=suffix)
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["desc_act"] is True
    for target in ("compressed-tensors", "afpq"):
        export_cli.export(act, tmp_path / target, format=target)
        back = _same_logits(act, tmp_path / target)
        assert back.layers[0].mlp.down_proj.scheme.act_order_groups
    ct = load_file(tmp_path / "compressed-tensors" / "model.safetensors")
    np.testing.assert_array_equal(ct[f"{name}.weight_g_idx"], g_idx)

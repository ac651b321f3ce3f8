"""Quantized Hugging Face checkpoints into afpq-jax, packed as they are (no dequantize-requantize).

`quant_method` tells a quantized directory from a float one; `load_quantized` builds the model: each quantized
``Linear``'s tensors decoded by its format's codec into a `QuantizedTensor` (`compressed_tensors`: pack-quantized,
nvfp4 and mxfp4; `gptq`: GPTQ v1 / v2 and AWQ GEMM; `afpq_safetensors`: the afpq layout), every other tensor
mapped by the family's key table as for a float model. The schemes follow the data: a layer whose tensors do not
match its configuration is a `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.interop import afpq_safetensors, compressed_tensors, gptq
from afpq_jax._src.io import files
from afpq_jax._src.io.sources import Source
from afpq_jax._src.loading import ModelAssembler, dotted
from afpq_jax._src.models import CausalLM, ModelConfig, family_for
from afpq_jax._src.models.params import map_key, to_model_layout
from afpq_jax._src.qtensor import LEAF_NAMES, QuantizedTensor
from afpq_jax._src.scheme import QuantScheme

METHODS = ("compressed-tensors", "gptq", "awq", "afpq")
# tensor suffixes of one quantized Linear, and the one that marks it
_SUFFIXES = {"compressed-tensors": ("weight_packed", {"weight_packed", "weight_scale", "weight_zero_point",
                                                      "weight_shape", "weight_global_scale", "weight_g_idx",
                                                      "input_scale"}),
             "gptq": ("qweight", {"qweight", "qzeros", "scales", "g_idx"}),
             "awq": ("qweight", {"qweight", "qzeros", "scales"}),
             "afpq": ("weight_packed", set(afpq_safetensors.SUFFIXES))}


def quantization_config(source: Source) -> dict[str, Any] | None:
    """The checkpoint's quantization config (config.json's ``quantization_config``, or an older GPTQ directory's
    quantize_config.json), or None for a float checkpoint."""
    qc = source.config.get("quantization_config")
    if qc is None and source.kind == "safetensors" and (source.path / "quantize_config.json").is_file():
        qc = {"quant_method": "gptq", **files.read_json_object(source.path / "quantize_config.json")}
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source.path}: quantization_config must be a JSON object, got {files.json_kind(qc)}")
    return qc


def quant_method(source: Source) -> str | None:
    """``compressed-tensors`` / ``gptq`` / ``awq`` / ``afpq`` for a quantized checkpoint, None for a float one;
    another method is a `CheckpointError`."""
    qc = quantization_config(source)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method not in METHODS:
        raise CheckpointError(f"{source.path}: quant_method {method!r} is not readable; afpq-jax reads "
                              f"{', '.join(METHODS)} checkpoints and float models")
    return method


def _match_rank(name: str, targets) -> int | None:
    """How specifically ``targets`` name a Linear module: 0 by its name, 1 by a ``re:`` pattern, 2 as "Linear"
    (compressed-tensors and vLLM prefer the most specific match, whatever the groups' order); None: no match."""
    ranks = [0 if t == name else 1 if t.startswith("re:") and re.match(t[3:], name) else 2 if t == "Linear" else None
             for t in targets or () if isinstance(t, str)]
    ranks = [r for r in ranks if r is not None]
    return min(ranks) if ranks else None


def _ct_group(name: str, qc: dict) -> tuple[dict, dict | None, str]:
    ranked = [(rank, group) for group in (qc.get("config_groups") or {}).values() if isinstance(group, dict)
              and (rank := _match_rank(name, group.get("targets"))) is not None]
    if not ranked:
        raise CheckpointError(f"{name} has compressed weights but no config group targets it; the config and the "
                              f"tensors disagree")
    group = min(ranked, key=lambda r: r[0])[1]
    return group.get("weights") or {}, group.get("input_activations"), group.get("format") or qc.get("format")


def _act_scheme(acts: dict | None, name: str) -> tuple[int | None, str | None]:
    if acts is None:
        return None, None
    if acts.get("type", "int") == "int" and acts.get("num_bits") == 8 and acts.get("symmetric", True):
        if acts.get("dynamic") and acts.get("strategy") == "token":
            return 8, "dynamic"
        if not acts.get("dynamic") and acts.get("strategy") == "tensor":
            return 8, "static"
    raise CheckpointError(f"{name}: input activations {acts} are not an int8 scheme afpq-jax runs (per-token "
                          f"dynamic or per-tensor static symmetric int8)")


def _gptq_args(name: str, qc: dict) -> dict | None:
    """bits / group_size / sym of one module (GPTQModel's ``dynamic``: ``+:regex`` overrides, ``-:regex`` skips;
    None: not quantized)."""
    args = {k: qc.get(k) for k in ("bits", "group_size", "sym")}
    for pattern, override in (qc.get("dynamic") or {}).items():  # the first matching rule decides (as GPTQModel)
        regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        if re.match(regex, name):
            if pattern.startswith("-:"):
                return None
            return {**args, **{k: v for k, v in (override or {}).items() if k in args}}
    return args


def _decode(method: str, qc: dict, name: str, tensors: Mapping[str, np.ndarray], dtype: str
            ) -> tuple[QuantizedTensor, QuantScheme, float | None, np.ndarray | None]:
    """(packed weight, its scheme, static input scale or None, input permutation or None) of one layer."""
    act_bits = act_mode = input_scale = perm = None
    if method == "compressed-tensors":
        weights, acts, fmt = _ct_group(name, qc)
        qt, perm = compressed_tensors.decode_layer(tensors, weights, fmt, dtype=dtype, where=name)
        act_bits, act_mode = _act_scheme(acts, name)
        if act_mode == "static":
            if "input_scale" not in tensors:
                raise CheckpointError(f"{name}: static int8 activations but no input_scale tensor")
            input_scale = float(np.asarray(tensors["input_scale"], np.float32).reshape(-1)[0])
    elif method == "afpq":
        layers = qc.get("layers")
        if not isinstance(layers, dict) or name not in layers:
            raise CheckpointError(f"{name} has afpq tensors but quantization_config.layers has no scheme for it")
        try:
            scheme = QuantScheme.from_json(layers[name])
        except (InputError, TypeError) as e:
            raise CheckpointError(f"{name}: {e}") from None
        qt, input_scale, perm = afpq_safetensors.decode_layer(tensors, scheme, dtype, name)
        return qt, scheme, input_scale, perm
    elif method == "gptq":
        args = _gptq_args(name, qc)
        if args is None:
            raise CheckpointError(f"{name} has GPTQ tensors but quantize_config's dynamic rules skip it")
        if qc.get("desc_act") and "g_idx" not in tensors:
            raise CheckpointError(f"{name}: desc_act checkpoint without g_idx")
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        k = _in_features(tensors["qweight"], args["bits"], name)
        qt, perm = gptq.decode_layer(tensors, bits=args["bits"], group_size=args["group_size"], sym=args["sym"],
                                     checkpoint_format=fmt, in_features=k, dtype=dtype)
    else:  # awq
        if qc.get("version", "gemm").lower() != "gemm" or qc.get("bits", qc.get("w_bit", 4)) != 4:
            raise CheckpointError(f"AWQ checkpoint version {qc.get('version')!r} with {qc.get('bits')} bits: "
                                  f"afpq-jax reads 4-bit GEMM checkpoints")
        group = qc.get("group_size", qc.get("q_group_size"))
        qt = gptq.decode_awq_layer(tensors, group_size=group, in_features=int(tensors["qweight"].shape[0]),
                                   dtype=dtype)
    scale_dtype = jnp.dtype((qt.scale if qt.channel_scale is None else qt.channel_scale).dtype).name
    scheme = QuantScheme(format=qt.format_name, group_size=qt.group_size, asym=qt.asym, scale_dtype=scale_dtype,
                         act_bits=act_bits, act_mode=act_mode, act_order_groups=perm is not None)
    return qt, scheme, input_scale, perm


def _in_features(qweight: np.ndarray, bits, name: str) -> int:
    if bits not in (2, 3, 4, 8):
        raise CheckpointError(f"{name}: {bits}-bit GPTQ weights; afpq-jax reads 2, 3, 4 and 8 bits")
    return int(qweight.shape[0]) * 32 // bits


def load_quantized(source: Source, cfg: ModelConfig, *, dtype=jnp.float32, mesh=None) -> CausalLM:
    """The model of a quantized checkpoint (`quant_method` is not None), packed layers as stored."""
    method = quant_method(source)
    qc = quantization_config(source)
    marker, suffixes = _SUFFIXES[method]
    rules = family_for(source.config).KEY_RULES
    names = set(source.tensor_names)
    quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith("." + marker)}
    layer_tensors: dict[str, dict[str, str]] = defaultdict(dict)
    plain = []
    for n in sorted(names):
        prefix, _, suffix = n.rpartition(".")
        if prefix in quantized and suffix in suffixes:
            layer_tensors[prefix][suffix] = n
        else:
            plain.append(n)
    dt = jnp.dtype(dtype).name
    layout, decoded = {}, {}
    for prefix, by_suffix in layer_tensors.items():
        try:
            path, _ = map_key(rules, prefix + ".weight", cfg.tie_embeddings)
        except KeyError:
            raise CheckpointError(f"quantized tensors {prefix}.* belong to no layer of a {cfg.model_type} "
                                  f"model; the checkpoint does not match its config.json") from None
        if path is None or path[-1] != "kernel":
            raise CheckpointError(f"{prefix} is quantized but is not a linear layer of this model")
        tensors = {suffix: source.read(n) for suffix, n in by_suffix.items()}
        qt, scheme, input_scale, perm = _decode(method, qc, prefix, tensors, dt)
        layer = dotted(path[:-1])
        layout[layer] = scheme
        decoded[layer] = (path[:-1], qt, input_scale, perm)
    if not layout:
        raise CheckpointError(f"{source.path} says quant_method {method!r} but holds no quantized layer "
                              f"(no *.{marker} tensor)")
    asm = ModelAssembler(cfg, layout, jnp.dtype(dtype), mesh)
    for layer_path, qt, input_scale, perm in decoded.values():
        for leaf in LEAF_NAMES:
            value = getattr(qt, leaf)
            if value is not None:
                asm.place((*layer_path, leaf), jnp.asarray(value))
        if input_scale is not None:
            asm.place((*layer_path, "input_scale"), jnp.asarray(input_scale, jnp.float32))
        if perm is not None:
            asm.place((*layer_path, "input_perm"), jnp.asarray(perm, jnp.int32))
    for n in plain:
        try:
            path, transpose = map_key(rules, n, cfg.tie_embeddings)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {n!r} in {source.path} for a {method} {cfg.model_type} "
                                  f"checkpoint") from None
        if path is None:
            continue
        arr = source.read(n)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {n!r} has non-float dtype {arr.dtype}")
        asm.place(path, jnp.asarray(to_model_layout(arr, transpose), dtype))
    return asm.finish()


def float_config(config: Mapping[str, Any]) -> str:
    """config.json without its quantization_config, as the JSON text a model's provenance keeps (a re-export or
    an afpq-jax checkpoint writes its own)."""
    return json.dumps({k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True)

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
from afpq_jax._src.formats import get_format
from afpq_jax._src.interop import afpq_safetensors, compressed_tensors, gptq
from afpq_jax._src.io import files
from afpq_jax._src.io.sources import Source
from afpq_jax._src.loading import ModelAssembler, check_float, dotted, model_path
from afpq_jax._src.models import CausalLM, ModelConfig, family_for
from afpq_jax._src.models.params import map_key, to_model_layout
from afpq_jax._src.qtensor import LEAF_NAMES, QuantizedTensor
from afpq_jax._src.scheme import QuantScheme

METHODS = ("compressed-tensors", "gptq", "awq", "afpq")
# the tensor that marks a quantized Linear, and all its tensors (the names after its module name)
_MARKER = {"compressed-tensors": "weight_packed", "gptq": "qweight", "awq": "qweight", "afpq": "weight_packed"}
_SUFFIXES = {"compressed-tensors": (*compressed_tensors.SUFFIXES, "input_scale"), "gptq": gptq.GPTQ_SUFFIXES,
             "awq": gptq.AWQ_SUFFIXES, "afpq": afpq_safetensors.SUFFIXES}


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


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false"}


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    """``obj[key]`` checked to be of ``kind`` (``default`` when absent or null); a `CheckpointError` otherwise."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"quantization_config{where}.{key} must be {_KINDS[kind]}, got "
                              f"{files.json_kind(value)}; the config is damaged")
    return value


def _matches(pattern: str, name: str, where: str) -> bool:
    try:
        return re.match(pattern, name) is not None
    except re.error as e:
        raise CheckpointError(f"quantization_config{where}: {pattern!r} is not a regular expression ({e})") from None


def _match_rank(name: str, targets: list, where: str) -> int | None:
    """How specifically ``targets`` name a Linear module: 0 by its name, 1 by a ``re:`` pattern, 2 as "Linear"
    (compressed-tensors and vLLM prefer the most specific match, whatever the groups' order); None: no match."""
    ranks = []
    for t in targets:
        if not isinstance(t, str):
            raise CheckpointError(f"quantization_config{where}.targets must be strings, got {files.json_kind(t)}")
        if t == name:
            ranks.append(0)
        elif t.startswith("re:") and _matches(t[3:], name, where):
            ranks.append(1)
        elif t == "Linear":
            ranks.append(2)
    return min(ranks) if ranks else None


def _ct_group(name: str, qc: dict) -> tuple[dict, dict | None, str]:
    """(weights args, input_activations args, format) of the config group that targets module ``name``."""
    ignore = _field(qc, "ignore", list, "", [])
    if _match_rank(name, [t for t in ignore if t != "Linear"], ".ignore") is not None:
        raise CheckpointError(f"{name} is in quantization_config.ignore but has quantized tensors; the config and "
                              f"the tensors disagree")
    ranked = []
    for key, group in _field(qc, "config_groups", dict, "", {}).items():
        where = f".config_groups.{key}"
        if not isinstance(group, dict):
            raise CheckpointError(f"quantization_config{where} must be an object, got {files.json_kind(group)}")
        rank = _match_rank(name, _field(group, "targets", list, where, []), where)
        if rank is not None:
            ranked.append((rank, key, group))
    if not ranked:
        raise CheckpointError(f"{name} has compressed weights but no config group targets it; the config and the "
                              f"tensors disagree")
    _, key, group = min(ranked, key=lambda r: r[0])
    where = f".config_groups.{key}"
    return (_field(group, "weights", dict, where, {}), _field(group, "input_activations", dict, where),
            _field(group, "format", str, where) or _field(qc, "format", str, ""))


def _act_scheme(acts: dict | None, name: str) -> tuple[int | None, str | None]:
    if acts is None:
        return None, None
    if acts.get("type", "int") == "int" and acts.get("num_bits") == 8 and acts.get("symmetric", True):
        if acts.get("dynamic") is True and acts.get("strategy") == "token":
            return 8, "dynamic"
        if acts.get("dynamic") is False and acts.get("strategy") == "tensor":
            return 8, "static"
    raise CheckpointError(f"{name}: input activations {acts} are not an int8 scheme afpq-jax runs (per-token "
                          f"dynamic or per-tensor static symmetric int8)")


def _gptq_args(name: str, qc: dict) -> dict | None:
    """bits / group_size / sym of one module (GPTQModel's ``dynamic``: ``+:regex`` overrides, ``-:regex`` skips;
    the first matching rule decides, as in GPTQModel and vLLM; None: not quantized)."""
    args = {"bits": _field(qc, "bits", int, ""), "group_size": _field(qc, "group_size", int, "", -1),
            "sym": _field(qc, "sym", bool, "", True)}
    for pattern, override in _field(qc, "dynamic", dict, "", {}).items():
        regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        if _matches(regex, name, ".dynamic"):
            if pattern.startswith("-:"):
                return None
            if not isinstance(override, dict):
                raise CheckpointError(f"quantization_config.dynamic[{pattern!r}] must be an object, got "
                                      f"{files.json_kind(override)}")
            args = {**args, **{k: _field(override, k, type(args[k]) if args[k] is not None else int,
                                         f".dynamic[{pattern!r}]") for k in args if k in override}}
            break
    if args["bits"] is None:
        raise CheckpointError("quantization_config has no bits; a GPTQ config needs bits, group_size and sym")
    return args


def _afpq_scheme(qc: dict, name: str) -> QuantScheme:
    version = _field(qc, "layout_version", int, "")
    if version != afpq_safetensors.LAYOUT_VERSION:
        raise CheckpointError(f"afpq layout_version {version!r}; this afpq-jax reads version "
                              f"{afpq_safetensors.LAYOUT_VERSION} — upgrade afpq-jax or export the model again")
    for fmt, info in _field(qc, "formats", dict, "", {}).items():
        try:
            ours = get_format(fmt)
        except InputError:
            raise CheckpointError(f"afpq checkpoint uses format {fmt!r}, which this afpq-jax does not have") from None
        if not isinstance(info, dict) or info.get("levels") != list(ours.levels):
            raise CheckpointError(f"afpq checkpoint's {fmt} levels differ from this afpq-jax's; its codes would "
                                  f"decode to other values — export the model again")
    layers = _field(qc, "layers", dict, "", {})
    if name not in layers:
        raise CheckpointError(f"{name} has afpq tensors but quantization_config.layers has no scheme for it")
    try:
        return QuantScheme.from_json(layers[name])
    except (InputError, TypeError) as e:
        raise CheckpointError(f"{name}: {e}") from None


def _decode(method: str, qc: dict, name: str, tensors: Mapping[str, np.ndarray], dtype: str
            ) -> tuple[QuantizedTensor, QuantScheme, float | None, np.ndarray | None]:
    """(packed weight, its scheme, static input scale or None, input permutation or None) of one layer."""
    act_bits = act_mode = input_scale = perm = None
    if method == "compressed-tensors":
        weights, acts, fmt = _ct_group(name, qc)
        act_bits, act_mode = _act_scheme(acts, name)
        if act_mode == "static":
            if "input_scale" not in tensors:
                raise CheckpointError(f"{name}: static int8 activations but no input_scale tensor")
            input_scale = float(np.asarray(tensors["input_scale"], np.float32).reshape(-1)[0])
        elif "input_scale" in tensors:
            raise CheckpointError(f"{name}: an input_scale tensor but no static activation scheme in the config")
        weight_tensors = {k: v for k, v in tensors.items() if k != "input_scale"}
        qt, perm = compressed_tensors.decode_layer(weight_tensors, weights, fmt, dtype=dtype, where=name,
                                                   version=_field(qc, "version", str, ""))
    elif method == "afpq":
        scheme = _afpq_scheme(qc, name)
        qt, input_scale, perm = afpq_safetensors.decode_layer(tensors, scheme, dtype, name)
        return qt, scheme, input_scale, perm
    elif method == "gptq":
        args = _gptq_args(name, qc)
        if args is None:
            raise CheckpointError(f"{name} has GPTQ tensors but quantize_config's dynamic rules skip it")
        if _field(qc, "desc_act", bool, "", False) and "g_idx" not in tensors:
            raise CheckpointError(f"{name}: desc_act checkpoint without g_idx")
        fmt = _field(qc, "checkpoint_format", str, "") or _field(qc, "format", str, "", "gptq")
        if args["bits"] not in gptq.GPTQ_BITS:
            raise CheckpointError(f"{name}: {args['bits']}-bit GPTQ weights; afpq-jax reads "
                                  f"{', '.join(map(str, gptq.GPTQ_BITS))} bits")
        k = int(tensors["qweight"].shape[0]) * 32 // args["bits"]
        qt, perm = gptq.decode_layer(tensors, bits=args["bits"], group_size=args["group_size"], sym=args["sym"],
                                     checkpoint_format=fmt, in_features=k, dtype=dtype)
    else:  # awq
        version = _field(qc, "version", str, "", "gemm")
        bits = _field(qc, "bits", int, "", _field(qc, "w_bit", int, "", 4))
        if version.lower() != "gemm" or bits != 4:
            raise CheckpointError(f"AWQ checkpoint version {version!r} with {bits} bits: afpq-jax reads 4-bit GEMM "
                                  f"checkpoints")
        group = _field(qc, "group_size", int, "", _field(qc, "q_group_size", int, ""))
        if group is None:
            raise CheckpointError("AWQ quantization_config has no group_size (or q_group_size)")
        qt = gptq.decode_awq_layer(tensors, group_size=group, in_features=int(tensors["qweight"].shape[0]),
                                   dtype=dtype)
    scale_dtype = jnp.dtype((qt.scale if qt.channel_scale is None else qt.channel_scale).dtype).name
    scheme = QuantScheme(format=qt.format_name, group_size=qt.group_size, asym=qt.asym, scale_dtype=scale_dtype,
                         act_bits=act_bits, act_mode=act_mode, act_order_groups=perm is not None)
    return qt, scheme, input_scale, perm


def load_quantized(source: Source, cfg: ModelConfig, *, dtype=jnp.float32, mesh=None) -> CausalLM:
    """The model of a quantized checkpoint (`quant_method` is not None), packed layers as stored."""
    method = quant_method(source)
    qc = quantization_config(source)
    marker, suffixes = _MARKER[method], _SUFFIXES[method]
    rules = family_for(source.config).KEY_RULES
    names = set(source.tensor_names)
    quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith("." + marker)}
    layer_tensors: dict[str, dict[str, str]] = defaultdict(dict)
    plain = []
    for n in sorted(names):
        prefix, _, suffix = n.rpartition(".")
        if prefix in quantized and suffix in suffixes:
            layer_tensors[prefix][suffix] = n
        elif prefix in quantized and suffix != "bias":
            raise CheckpointError(f"tensor {n!r} is not part of a {method} layer ({', '.join(suffixes)}); the "
                                  f"checkpoint mixes layouts")
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
        try:
            qt, scheme, input_scale, perm = _decode(method, qc, prefix, tensors, dt)
        except CheckpointError as e:  # the codecs name tensors by suffix: say whose
            raise (e if str(e).startswith(prefix) else CheckpointError(f"{prefix}: {e}")) from None
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
        path, transpose = model_path(rules, n, cfg, source)
        if path is not None:
            arr = source.read(n)
            check_float(arr.dtype, n)
            asm.place(path, jnp.asarray(to_model_layout(arr, transpose), dtype))
    return asm.finish()


def float_config(config: Mapping[str, Any]) -> str:
    """config.json without its quantization_config, as the JSON text a model's provenance keeps (a re-export or
    an afpq-jax checkpoint writes its own)."""
    return json.dumps({k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True)

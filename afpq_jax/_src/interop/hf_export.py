"""A quantized model out of afpq-jax: a Hugging Face directory that serving stacks read (`export`).

Targets (`TARGETS`): ``compressed-tensors`` (vLLM, transformers, llm-compressor: ``pack-quantized``,
``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``, ``mixed-precision`` when layers differ), ``gptq`` (GPTQModel /
AutoGPTQ: ``qweight``/``qzeros``/``scales``/``g_idx``, ``gptq_v2`` when any layer is asymmetric) and ``afpq``
(every afpq-jax scheme in plain safetensors, `afpq_safetensors`). The directory: safetensors shards of at most
5 GB with ``model.safetensors.index.json`` when there are several, config.json with ``quantization_config`` (GPTQ:
also quantize_config.json), the tokenizer and generation files, and ``manifest.json`` naming the export (so
``overwrite`` may replace it). Written into a staging directory and renamed into place: nothing half-written.

A layer the target cannot hold exactly is refused, all such layers named in one line, unless
``dequantize_unsupported``: then it is written as a bfloat16 ``.weight`` and listed in the result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src import checkpoint, quantizer, validation
from afpq_jax._src.errors import InputError, NotExportable
from afpq_jax._src.interop import afpq_safetensors, compressed_tensors, gptq
from afpq_jax._src.io import outputs
from afpq_jax._src.io.safetensors_io import ShardedWriter
from afpq_jax._src.models import CausalLM, family_for
from afpq_jax._src.models.transformer import FUSED_SIBLINGS
from afpq_jax._src.models.params import hf_key
from afpq_jax._src.qtensor import LEAF_NAMES, QuantizedTensor
from afpq_jax._src.scheme import QuantScheme

TARGETS = ("compressed-tensors", "gptq", "afpq")
MANIFEST_FORMAT = "afpq-jax-export/1"  # `outputs.is_afpq_output` recognises it: overwrite may replace an export
COMPRESSED_TENSORS_VERSION = "0.20.1"  # the release whose compressors the layouts were checked against
logger = logging.getLogger("afpq_jax")
FLOAT_DTYPES = validation.FLOAT_DTYPES


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the directory, the target, its shard files and the layers written dequantized."""

    path: Path
    target: str
    shards: tuple[str, ...]
    dequantized: tuple[str, ...]
    total_bytes: int
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str                 # our layer path, "layers.3.attn.q_proj"
    name: str                 # its Hugging Face module name, "model.layers.3.self_attn.q_proj"
    qt: QuantizedTensor
    scheme: QuantScheme
    input_scale: float | None
    input_perm: np.ndarray | None  # activation-order groups: stored row j is input row input_perm[j]


class _Target(Protocol):
    def why_not(self, layer: _Layer) -> str | None: ...
    def encode(self, layer: _Layer) -> dict[str, np.ndarray]: ...
    def config(self, layers: list[_Layer], float_linears: list[str], hf: dict) -> tuple[dict, dict[str, dict]]:
        """(config.json's quantization_config, other JSON files to write by name)."""
    def warnings(self, layers: list[_Layer], float_linears: list[str]) -> list[str]:
        """What readers of the format (vLLM above all) will not serve as written: one line each."""


# vLLM's names of the modules it fuses (`FUSED_SIBLINGS`), with one scheme (and, for NVFP4, one global scale) each:
# {a member's last name: the fused module's last name}
VLLM_FUSED = {member.rpartition(".")[2]: fused
              for members, fused in zip(FUSED_SIBLINGS, ("qkv_proj", "gate_up_proj")) for member in members}


def _fused_name(module: str) -> str | None:
    """vLLM's name of the fused module ``module`` is part of (``...self_attn.q_proj`` -> ``...self_attn.qkv_proj``),
    or None for a module vLLM runs alone."""
    head, _, last = module.rpartition(".")
    return f"{head}.{VLLM_FUSED[last]}" if last in VLLM_FUSED else None


def _fused_groups(layers: list[_Layer]) -> dict[str, list[_Layer]]:
    """{vLLM's fused module name: its member layers} for the layers vLLM fuses."""
    groups: dict[str, list[_Layer]] = defaultdict(list)
    for layer in layers:
        fused = _fused_name(layer.name)
        if fused is not None:
            groups[fused].append(layer)
    return groups


class _CompressedTensors:
    def __init__(self, dtype: str):
        self.dtype = dtype

    def why_not(self, layer: _Layer) -> str | None:
        reason = compressed_tensors.why_not_exportable(layer.qt, self.dtype)
        if reason is None and layer.input_perm is not None:
            return ("activation-order groups (compressed-tensors 0.20 and vLLM 0.34 refuse actorder 'group'; export "
                    "gptq or afpq)")
        if reason is None and layer.scheme.act_bits is not None and (
                layer.scheme.act_mode != "dynamic" or not layer.qt.format.is_int):
            return (f"{layer.scheme.act_mode} int8 activations on {layer.qt.format.name} weights (vLLM serves W·A8 "
                    f"compressed-tensors as INT weights with dynamic per-token activations)")
        return reason

    def encode(self, layer: _Layer) -> dict[str, np.ndarray]:
        return compressed_tensors.encode_layer(layer.qt, self.dtype)

    def config(self, layers, float_linears, hf):
        groups: dict[str, tuple[dict, dict | None, str, list[str]]] = {}
        for layer in layers:
            weights = compressed_tensors.weights_scheme(layer.qt)
            acts = compressed_tensors.input_activations(layer.scheme.act_bits, layer.scheme.act_mode)
            fmt = compressed_tensors.layer_format(layer.qt)
            key = json.dumps([weights, acts, fmt], sort_keys=True)
            groups.setdefault(key, (weights, acts, fmt, []))[3].append(layer.name)
        listed = list(groups.values())
        if len(listed) == 1:  # one scheme: every Linear not ignored, as llm-compressor writes it
            listed = [(w, a, f, ["Linear"]) for w, a, f, _ in listed]
        return compressed_tensors.quantization_config(listed, float_linears, COMPRESSED_TENSORS_VERSION), {}

    def warnings(self, layers: list[_Layer], float_linears: list[str]) -> list[str]:
        out = _mixed_fused(layers, float_linears, lambda layer: json.dumps(
            [compressed_tensors.weights_scheme(layer.qt), layer.scheme.act_mode]))
        for fused, members in _fused_groups(layers).items():
            scales = {float(np.asarray(m.qt.global_scale).reshape(-1)[0]) for m in members
                      if m.qt.global_scale is not None}
            if len(scales) > 1:
                out.append(f"{fused}: NVFP4 global scales differ ({min(scales):.4g}..{max(scales):.4g}); vLLM "
                           f"fuses these layers under the largest one, which changes their weights there "
                           f"(compressed-tensors and transformers read them exactly)")
        return out


def _mixed_fused(layers: list[_Layer], float_linears: list[str], scheme_of) -> list[str]:
    """Warnings for fused groups whose members differ in scheme (or are partly float)."""
    out = []
    floats = {_fused_name(name) for name in float_linears} - {None}
    for fused, members in _fused_groups(layers).items():
        if len({scheme_of(m) for m in members}) > 1 or fused in floats:
            out.append(f"{fused}: its layers have different schemes; vLLM serves them fused with one scheme and "
                       f"will refuse or misread them (use one scheme for q/k/v and for gate/up)")
    return out


class _Gptq:
    def __init__(self, layers: list[_Layer]):
        # one checkpoint format for the file: v2 when any layer has real zero points (v1's z - 1 overflows)
        self.v2 = any(gptq.default_format(layer.qt) == "gptq_v2" for layer in layers
                      if gptq.why_not_exportable(layer.qt) is None)

    def why_not(self, layer: _Layer) -> str | None:
        reason = gptq.why_not_exportable(layer.qt)
        if reason is None and layer.scheme.act_bits is not None:
            return "int8 activations (GPTQ checkpoints are weight-only; use compressed-tensors)"
        return reason

    def encode(self, layer: _Layer) -> dict[str, np.ndarray]:
        return gptq.encode_layer(layer.qt, checkpoint_format="gptq_v2" if self.v2 else "gptq",
                                 input_perm=layer.input_perm)

    @staticmethod
    def _args(layer: _Layer) -> dict[str, Any]:
        qt = layer.qt
        return {"bits": qt.format.bits, "group_size": -1 if qt.group_size is None or qt.group_size >= qt.in_features
                else qt.group_size, "sym": not qt.asym}

    def config(self, layers, float_linears, hf):
        base = Counter(json.dumps(self._args(layer), sort_keys=True) for layer in layers).most_common(1)[0][0]
        base_args = json.loads(base)
        # GPTQModel and vLLM take the first rule that matches a module; vLLM matches its fused names
        # (...self_attn.qkv_proj), so a rule also names the fused module when all its members agree
        wanted = {layer.name: self._args(layer) for layer in layers if self._args(layer) != base_args}
        wanted.update({name: None for name in float_linears if name != "lm_head"})
        dynamic: dict[str, dict] = {}
        covered: set[str] = set()
        members = defaultdict(list)
        for name in list(wanted) + [layer.name for layer in layers if layer.name not in wanted]:
            fused = _fused_name(name)
            if fused is not None:
                members[fused].append(name)
        for fused, names in members.items():
            args = {json.dumps(wanted.get(n, base_args), sort_keys=True) for n in names}
            if len(args) == 1 and names[0] in wanted:
                head, _, fused_last = fused.rpartition(".")
                lasts = sorted({n.rpartition(".")[2] for n in names} | {fused_last})
                key = f"^{re.escape(head)}\\.({'|'.join(lasts)})$"
                dynamic[("-:" if wanted[names[0]] is None else "+:") + key] = wanted[names[0]] or {}
                covered.update(names)
        for name, args in wanted.items():
            if name not in covered:
                dynamic[("-:" if args is None else "+:") + f"^{re.escape(name)}$"] = args or {}
        fmt = "gptq_v2" if self.v2 else "gptq"
        desc_act = any(layer.input_perm is not None for layer in layers)
        qc: dict[str, Any] = {**base_args, "desc_act": desc_act, "lm_head": any(l.path == "lm_head" for l in layers),
                              "quant_method": "gptq", "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
                              "true_sequential": True, "static_groups": False, "damp_percent": None,
                              "meta": {"quantizer": [f"afpq-jax:{_version()}"]}}
        if dynamic:
            qc["dynamic"] = dynamic
        return qc, {"quantize_config.json": qc}

    def warnings(self, layers: list[_Layer], float_linears: list[str]) -> list[str]:
        out = _mixed_fused(layers, float_linears, lambda layer: json.dumps(self._args(layer)))
        served = {(4, True), (8, True)}
        unserved = sorted({(a["bits"], a["sym"]) for a in map(self._args, layers)} - served)
        if unserved or any(layer.input_perm is not None for layer in layers):
            out.append("vLLM (0.34) serves GPTQ checkpoints of symmetric 4- and 8-bit weights without desc_act "
                       "only; this one loads in GPTQModel and transformers (for vLLM, export compressed-tensors)")
        return out


def _version() -> str:
    from afpq_jax import __version__
    return __version__


class _Afpq:
    def warnings(self, layers: list[_Layer], float_linears: list[str]) -> list[str]:
        return []

    def why_not(self, layer: _Layer) -> str | None:
        return afpq_safetensors.why_not_exportable(layer.qt)

    def encode(self, layer: _Layer) -> dict[str, np.ndarray]:
        return afpq_safetensors.encode_layer(layer.qt, layer.input_scale, layer.input_perm)

    def config(self, layers, float_linears, hf):
        from afpq_jax._src.formats import get_format
        fmts = sorted({layer.scheme.format for layer in layers})
        return {"quant_method": "afpq", "layout_version": afpq_safetensors.LAYOUT_VERSION,
                "layers": {layer.name: layer.scheme.to_json() for layer in layers},
                "formats": {f: {"bits": get_format(f).bits, "levels": list(get_format(f).levels)} for f in fmts},
                "ignore": float_linears}, {}


def _module_name(rules, layer_path: str, tied: bool) -> str:
    key, _ = hf_key(rules, (*_split(layer_path), "kernel"), tied)
    if not key.endswith(".weight"):
        raise RuntimeError(f"{layer_path}'s kernel maps to {key}, not a .weight")
    return key[: -len(".weight")]


def _split(dotted: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _host(value) -> np.ndarray:
    return np.asarray(jax.device_get(value))


def export(model: CausalLM, out_dir: str | os.PathLike, *, target: str = "compressed-tensors",
           dequantize_unsupported: bool = False, dtype: str | None = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 10**9, progress: bool = False) -> ExportResult:
    """Writes ``model`` (quantized by afpq-jax, or loaded from any checkpoint `afpq_jax.load` reads) as a Hugging
    Face directory in ``target``'s format (module docstring). ``dtype``: the float tensors' dtype and config.json's
    ``torch_dtype`` (default: the source model's ``torch_dtype``, else the model's own dtype); compressed-tensors'
    INT scales are written in it and must be exact in it. Refuses, naming them, layers the target cannot hold
    exactly unless ``dequantize_unsupported``."""
    if not isinstance(model, CausalLM):
        raise InputError(f"export expects an afpq_jax CausalLM, got {type(model).__name__}")
    if target not in TARGETS:
        raise InputError(f"unknown export format {target!r}; choose one of {', '.join(TARGETS)}")
    if jax.process_count() > 1:
        raise InputError("export runs in one process: load the checkpoint without --coordinator and export it there")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise InputError(f"export dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    info = model.checkpoint_info
    if info is None or not info.hf_config:
        raise InputError("this model carries no Hugging Face config.json (it was not made by load / "
                         "quantize_pretrained); load it from a checkpoint first")
    hf = json.loads(info.hf_config)
    hf.pop("quantization_config", None)
    source_dtype = hf.get("torch_dtype", hf.get("dtype"))
    out_dtype = np.dtype(dtype or (source_dtype if source_dtype in FLOAT_DTYPES else model.dtype))
    rules, tied = family_for(hf).KEY_RULES, model.cfg.tie_embeddings

    layers, float_linears = [], []
    for path, module in model.linear_layers().items():
        name = _module_name(rules, path, tied)
        if not module.is_quantized:
            float_linears.append(name)
            continue
        scale = None if module.input_scale is None else float(_host(module.input_scale.get_value()))
        perm = None if module.input_perm is None else _host(module.input_perm.get_value())
        # the packed leaves stay where they are; each codec reads one layer at a time onto the host
        layers.append(_Layer(path, name, module.quantized_tensor(), module.scheme, scale, perm))
    codec: _Target = (_CompressedTensors(out_dtype.name) if target == "compressed-tensors" else
                      _Gptq(layers) if target == "gptq" else _Afpq())
    refused = [(layer, codec.why_not(layer)) for layer in layers]
    refused = [(layer, reason) for layer, reason in refused if reason is not None]
    if refused and not dequantize_unsupported:
        reasons = sorted({r for _, r in refused})
        names = [layer.path for layer, _ in refused]
        raise NotExportable(f"{target} cannot hold {len(names)} layer(s) exactly ({'; '.join(reasons)}): "
                            f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}; export with --format afpq, "
                            f"or pass --dequantize-unsupported to write them as bfloat16")
    dequantized = [layer.path for layer, _ in refused]
    kept = [layer for layer in layers if layer.path not in dequantized]
    if not kept:
        raise InputError(f"the model has no layer {target} can hold as quantized; export a quantized model "
                         f"(or use --format afpq)")
    float_linears += [layer.name for layer, _ in refused]
    if model.lm_head is None:  # tied to the embeddings: a float Linear all the same for the readers
        float_linears.append("lm_head")

    quantized_paths = {layer.path for layer in layers}
    state = nnx.to_flat_state(nnx.state(model))
    extra = [".".join(map(str, p)) for p, _ in state
             if ".".join(map(str, p[:-1])) not in quantized_paths and p[-1] not in ("kernel", "bias", "weight")]
    if extra:
        raise NotExportable(f"the model has parameters Hugging Face's {model.cfg.model_type} has no place for "
                            f"({', '.join(extra[:3])}; AWQ's scale after BLOOM's GELU is one), in any export format "
                            f"— quantize with --method gptq or rtn to export")

    qconfig, extra_files = codec.config(kept, float_linears, hf)
    warnings = codec.warnings(kept, float_linears)
    for line in warnings:
        logger.warning("%s", line)
    hf_out = {**hf, "quantization_config": qconfig, "torch_dtype": out_dtype.name}
    if "dtype" in hf:  # transformers 5's name for it
        hf_out["dtype"] = out_dtype.name
    out = Path(out_dir)
    inputs = [info.source if info.source_kind != "model" else None, info.tokenizer_dir, info.gguf_path]
    by_layer = {layer.path: layer for layer in layers}
    with checkpoint.staging_dir(out, overwrite, inputs=inputs, hint="--overwrite") as tmp:
        # about the bytes to write (packed leaves as they are, float tensors in the export dtype): checked first
        outputs.require_space(tmp, 2**20 + sum(
            var.get_value().size * (np.dtype(var.get_value().dtype).itemsize if ".".join(map(str, p[:-1])) in by_layer
                                    else out_dtype.itemsize) for p, var in state))
        writer = ShardedWriter(tmp, max_shard_bytes, metadata={"format": "pt"})
        for p, var in tqdm(state, desc=f"exporting ({target})", unit="tensor", disable=not progress, leave=False):
            layer_path, leaf = ".".join(map(str, p[:-1])), p[-1]
            layer = by_layer.get(layer_path)
            if layer is not None and (leaf in LEAF_NAMES or leaf in ("input_scale", "input_perm")):
                if leaf != "codes":
                    continue  # one layer's tensors are written once, at its codes
                if layer.path in dequantized:
                    w = np.asarray(quantizer.dequantize(layer.qt, "bfloat16"))
                    w = (w if layer.input_perm is None else w[np.argsort(layer.input_perm)]).T
                    writer.add(f"{layer.name}.weight", w)
                else:
                    for suffix, arr in codec.encode(layer).items():
                        writer.add(f"{layer.name}.{suffix}", arr)
                continue
            key, transpose = hf_key(rules, p, tied)
            arr = _host(var.get_value())
            writer.add(key, (arr.T if transpose else arr).astype(out_dtype))
        shards = writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_out, indent=2, sort_keys=True) + "\n")
        for name, obj in extra_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        checkpoint.write_tokenizer(info, tmp)
        (tmp / "manifest.json").write_text(json.dumps(
            {"format": MANIFEST_FORMAT, "target": target, "dequantized": dequantized,
             "source": info.source}, indent=2) + "\n")
    return ExportResult(out.absolute(), target, tuple(shards), tuple(dequantized), writer.total_size,
                        tuple(warnings))

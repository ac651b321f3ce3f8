"""The ``afpq`` safetensors layout: every scheme afpq-jax has, in plain safetensors (spec in the README).

Tensors of one quantized ``Linear`` (torch layout: ``out`` = output features, ``in`` = input features,
``G = ceil(in / group_size)`` groups, one per output column for per-channel):

* ``weight_packed`` int32 ``[out, ceil(in·b/32)]``: the ``b``-bit codes of a row as one little-endian bit string,
  code ``i`` at bits ``i·b`` (compressed-tensors' dense ``pack-quantized`` packing). A code is an index into the
  format's ascending level table (``quantization_config.formats``; FP formats list -0 before +0).
* ``weight_scale`` ``[out, G]``: the single scale of a symmetric group, ``s_pos`` of an asymmetric code-book group
  (AFPQ), the step of an asymmetric INT group. Stored in the scheme's scale dtype (F16 / BF16 / F32 / F8_E4M3; E8M0
  as U8, the biased exponent ``e`` of ``2^(e-127)``); U8 integers when ``weight_channel_scale`` is present.
* ``weight_scale_neg`` ``[out, G]``: AFPQ's ``s_neg`` (asymmetric code-book formats only).
* ``weight_zero_point`` U8 ``[out, G]``: asymmetric INT zero points (symmetric INT: the implicit ``2^(b-1)``).
* ``weight_channel_scale`` ``[out]``: integer group scales' per-column float scale (QServe-style).
* ``weight_global_scale`` F32 ``[1]``: the per-tensor scale of E4M3 group scales (NVFP4's).
* ``weight_shape`` I64 ``[2]``: ``[out, in]``.
* ``input_scale`` F32 ``[1]``: the calibrated int8 activation scale of a static W·A8 layer.
* ``input_perm`` I32 ``[in]``: activation-order groups (``act_order_groups``): stored input row ``j`` (of
  ``weight_packed`` and the groups) is the layer's input row ``input_perm[j]``.

Dequantization of code ``q`` in group ``g`` of column ``n``: ``level[q] · s`` with ``s = weight_scale`` for
``level ≥ 0`` and ``weight_scale_neg`` below (asymmetric code books); ``(q − zero) · s`` for INT; where
``s`` = ``stored · channel_scale[n]`` for integer scales and ``stored / global_scale`` for E4M3 scales (computed as
``stored · (1 / global_scale)``, rounded once in float32).
"""

from __future__ import annotations

import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.formats import get_format
from afpq_jax._src.interop import bitstream
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.scheme import QuantScheme

LAYOUT_VERSION = 1
SUFFIXES = ("weight_packed", "weight_scale", "weight_scale_neg", "weight_zero_point", "weight_channel_scale",
            "weight_global_scale", "weight_shape", "input_scale", "input_perm")


def why_not_exportable(qt: QuantizedTensor) -> str | None:
    """None: the afpq layout holds every scheme of a 2-D weight; stacked weights are refused (the reason)."""
    if qt.codes.ndim != 2:
        return "stacked weights (export one 2-D weight per layer)"
    return None


def _torch(a) -> np.ndarray:
    """A (G, N) leaf in torch layout [N, G]; E8M0 scales as their exponent byte."""
    a = np.asarray(a)
    if a.dtype.name == "float8_e8m0fnu":
        a = a.view(np.uint8)
    return np.ascontiguousarray(a.T)


def encode_layer(qt: QuantizedTensor, input_scale: float | None = None,
                 input_perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The layer's tensors by suffix (module docstring)."""
    fmt = qt.format
    codes = np.asarray(packing.unpack(qt.codes, fmt.bits, qt.in_features)).T  # (out, in)
    out = {"weight_packed": bitstream.pack_int32(codes, fmt.bits, axis=1), "weight_scale": _torch(qt.scale),
           "weight_shape": np.asarray([qt.out_features, qt.in_features], np.int64)}
    if qt.scale_neg is not None:
        out["weight_scale_neg"] = _torch(qt.scale_neg)
    if qt.zero is not None:
        out["weight_zero_point"] = _torch(qt.zero)
    if qt.channel_scale is not None:
        out["weight_channel_scale"] = np.asarray(qt.channel_scale)
    if qt.global_scale is not None:
        out["weight_global_scale"] = np.asarray(qt.global_scale, np.float32).reshape(1)
    if input_scale is not None:
        out["input_scale"] = np.asarray(input_scale, np.float32).reshape(1)
    if input_perm is not None:
        out["input_perm"] = np.asarray(input_perm, np.int32)
    return out


def _need(tensors, name: str, where: str) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(f"{where}: missing tensor {name}; the checkpoint is incomplete")
    return tensors[name]


def _leaf(a: np.ndarray, dtype: str, shape: tuple[int, ...], name: str, where: str) -> np.ndarray:
    """A stored [out, G] tensor back as our (G, N) leaf of ``dtype`` (E8M0 from its byte)."""
    want = np.dtype("uint8") if dtype == "float8_e8m0fnu" else np.dtype(dtype)
    if a.dtype != want or tuple(a.shape) != shape:
        raise CheckpointError(f"{where}.{name} is {a.dtype.name}{list(a.shape)}, the scheme needs "
                              f"{want.name}{list(shape)}; the file is damaged or from another layout")
    if dtype == "float8_e8m0fnu":
        a = a.view(np.dtype("float8_e8m0fnu"))
    return np.ascontiguousarray(a.T)


def decode_layer(tensors, scheme: QuantScheme, dtype: str, where: str
                 ) -> tuple[QuantizedTensor, float | None, np.ndarray | None]:
    """(packed weight, static input scale or None, input permutation or None) of one layer stored by
    `encode_layer` under ``scheme``; ``dtype`` is the model's float dtype, ``where`` the layer's name for errors."""
    fmt = scheme.format
    f = get_format(fmt)
    shape = _need(tensors, "weight_shape", where)
    if shape.shape != (2,) or not np.issubdtype(shape.dtype, np.integer) or shape.min() <= 0:
        raise CheckpointError(f"{where}.weight_shape must be two positive integers [out, in], got {shape.tolist()}")
    n, k = (int(v) for v in shape)
    g = k if scheme.group_size is None else min(scheme.group_size, k)
    groups = -(-k // g)
    words = _need(tensors, "weight_packed", where)
    if words.dtype != np.int32 or words.shape != (n, -(-k * f.bits // 32)):
        raise CheckpointError(f"{where}.weight_packed is {words.dtype.name}{list(words.shape)}, expected "
                              f"int32{[n, -(-k * f.bits // 32)]} for {n}x{k} {f.bits}-bit codes")
    codes = bitstream.unpack_int32(words, f.bits, k, axis=1).T  # (in, out)
    if codes.max(initial=0) >= len(f.levels):
        raise CheckpointError(f"{where}.weight_packed holds code {int(codes.max())} but {fmt} has {len(f.levels)} "
                              f"levels; the file is damaged")
    scale_dtype = "uint8" if scheme.integer_scales else scheme.scale_dtype
    leaves = {"codes": packing.pack(codes, f.bits),
              "scale": _leaf(_need(tensors, "weight_scale", where), scale_dtype, (n, groups), "weight_scale", where)}
    code_book_asym = scheme.asym and not f.is_int
    if code_book_asym:
        leaves["scale_neg"] = _leaf(_need(tensors, "weight_scale_neg", where), scale_dtype, (n, groups),
                                    "weight_scale_neg", where)
    if scheme.asym and f.is_int:
        leaves["zero"] = _leaf(_need(tensors, "weight_zero_point", where), "uint8", (n, groups),
                               "weight_zero_point", where)
    if scheme.integer_scales:
        ch = _need(tensors, "weight_channel_scale", where)
        leaves["channel_scale"] = _leaf(ch[None], scheme.scale_dtype, (1, n), "weight_channel_scale", where)[:, 0]
    if scheme.scale_dtype == "float8_e4m3fn":
        gs = _need(tensors, "weight_global_scale", where)
        leaves["global_scale"] = _leaf(gs[None], "float32", (1, 1), "weight_global_scale", where)[0]
    expected = {"weight_packed", "weight_scale", "weight_shape"} | {name for name, present in (
        ("weight_scale_neg", code_book_asym), ("weight_zero_point", scheme.asym and f.is_int),
        ("weight_channel_scale", scheme.integer_scales), ("weight_global_scale", scheme.scale_dtype == "float8_e4m3fn"),
        ("input_scale", scheme.act_mode == "static"), ("input_perm", scheme.act_order_groups)) if present}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(f"{where}: tensor(s) {', '.join(extra)} do not belong to a layer of scheme {scheme}; "
                              f"the config and the tensors disagree")
    qt = QuantizedTensor(**leaves, format_name=f.name, group_size=scheme.group_size, asym=scheme.asym,
                         shape=(k, n), dtype=dtype)
    try:
        qt.validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    input_scale = perm = None
    if scheme.act_mode == "static":
        s = _need(tensors, "input_scale", where)
        input_scale = float(np.asarray(s, np.float32).reshape(-1)[0])
    if scheme.act_order_groups:
        perm = _need(tensors, "input_perm", where)
        if perm.dtype != np.int32 or not np.array_equal(np.sort(perm), np.arange(k)):
            raise CheckpointError(f"{where}.input_perm must be an int32 permutation of 0..{k - 1}; the file is damaged")
    return qt, input_scale, perm

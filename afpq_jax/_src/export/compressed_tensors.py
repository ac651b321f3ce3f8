"""One packed layer in compressed-tensors' on-disk form (vllm-project/compressed-tensors, read by vLLM and
transformers): the tensors of a ``Linear`` and the ``weights`` scheme of its config group.

Layouts (`shared/interop.md`; matched against compressed-tensors 0.17's compressors):

* ``pack-quantized`` (INT, sym or asym, 2/3/4/8-bit, group or channel): ``weight_packed`` int32
  ``[out, ceil(in·b/32)]``, element ``i`` of a row at bits ``i·b`` of the row's bit string, LSB first (dense: since
  0.17 3-bit codes straddle words); ``weight_scale`` ``[out, groups]`` in the scales' dtype; ``weight_shape`` int64
  ``[out, in]``; asym: ``weight_zero_point`` ``[ceil(out·b/32), groups]``, packed the same way along the output
  axis. Codes and zero points are stored offset by ``2^(b-1)`` from compressed-tensors' signed values, which makes
  them exactly our unsigned codes and zero points (sym: our implicit zero point ``2^(b-1)``).
* ``nvfp4-pack-quantized`` (FP4 E2M1, sym, groups of 16, float8_e4m3fn scales, a float32 global scale):
  ``weight_packed`` uint8 ``[out, in/2]``, element ``2j`` in the low nibble, nibble = sign·8 + the index of its
  magnitude in {0, .5, 1, 1.5, 2, 3, 4, 6}; ``weight_scale`` float8_e4m3fn ``[out, in/16]``;
  ``weight_global_scale`` float32 ``[1]``; dequantization ``fp4 · (scale / global_scale)``.
* ``mxfp4-pack-quantized`` (FP4 E2M1, sym, groups of 32, E8M0 scales): the same codes; ``weight_scale`` uint8, the
  biased exponent ``e`` of ``2^(e-127)``.

A layer none of them holds exactly (AFPQ's two scales, NF / FP3 code books, other scale formats) raises
`NotExportable` with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import InputError
from afpq_jax._src.qtensor import QuantizedTensor

INT_BITS = (2, 3, 4, 8)
FLOAT_SCALES = ("float16", "bfloat16", "float32")


class NotExportable(InputError):
    """This layer's scheme has no exact form in the target format (the message says why)."""


def pack_rows_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values ``(R, C)`` -> int32 ``(R, ceil(C·bits/32))``: value ``i`` of a row at bit
    ``i·bits`` of the row's little-endian bit string (compressed-tensors' dense packing)."""
    v = np.asarray(values, np.uint32)
    r, c = v.shape
    bit_rows = ((v[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(r, c * bits)
    words = -(-c * bits // 32)
    bit_rows = np.pad(bit_rows, ((0, 0), (0, words * 32 - c * bits)))
    return np.ascontiguousarray(np.packbits(bit_rows, axis=1, bitorder="little")).view("<i4").reshape(r, words)


def fp4_nibbles(codes: np.ndarray) -> np.ndarray:
    """Our FP4 E2M1 codes (indices into -6 .. -0, +0 .. 6) -> compressed-tensors' nibbles (sign·8 + magnitude
    index): +0..6 are codes 8..15 (index code - 8), -0..-6 are codes 7..0 (8 + 7 - code)."""
    c = np.asarray(codes, np.uint8)
    return np.where(c >= 8, c - 8, 15 - c).astype(np.uint8)


def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """``(R, C)`` nibbles, C even -> uint8 ``(R, C/2)``: element 2j in the low nibble, 2j+1 in the high one."""
    n = np.asarray(nibbles, np.uint8)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).astype(np.uint8)


def why_not_exportable(qt: QuantizedTensor) -> str | None:
    """None if compressed-tensors holds ``qt`` exactly, else the reason (one phrase)."""
    if qt.codes.ndim != 2:
        return "stacked weights (export one 2-D weight per layer)"
    fmt, sd = qt.format, qt.scale_dtype
    if fmt.is_int:
        if fmt.bits not in INT_BITS:
            return f"{fmt.bits}-bit integers (pack-quantized holds {', '.join(map(str, INT_BITS))})"
        if sd not in FLOAT_SCALES:
            return f"{sd} scales on integer weights (pack-quantized takes float16/bfloat16/float32 scales)"
        return None
    if fmt.name != "fp4_e2m1":
        return f"the {fmt.name} code book (compressed-tensors holds INT and FP4 E2M1 only)"
    if qt.asym:
        return "AFPQ's two scales per group (compressed-tensors' FP4 is symmetric)"
    if sd == "float8_e4m3fn" and qt.group_size == 16:
        return None
    if sd == "float8_e8m0fnu" and qt.group_size == 32:
        return None
    return (f"FP4 E2M1 with {sd} scales in groups of {qt.group_size} (NVFP4: float8_e4m3fn in groups of 16; "
            "MXFP4: float8_e8m0fnu in groups of 32)")


def layer_format(qt: QuantizedTensor) -> str:
    """The compressed-tensors format name of an exportable layer."""
    if qt.format.is_int:
        return "pack-quantized"
    return "nvfp4-pack-quantized" if qt.scale_dtype == "float8_e4m3fn" else "mxfp4-pack-quantized"


def weights_scheme(qt: QuantizedTensor) -> dict[str, Any]:
    """The ``weights`` object of the layer's config group (`QuantizationArgs`)."""
    fmt = qt.format
    channel = qt.group_size is None or qt.group_size >= qt.in_features  # one group per output column
    args: dict[str, Any] = {"num_bits": fmt.bits, "type": "int" if fmt.is_int else "float",
                            "symmetric": not qt.asym, "dynamic": False, "actorder": None,
                            "strategy": "channel" if channel and fmt.is_int else "group",
                            "group_size": None if channel and fmt.is_int else qt.group_size}
    if layer_format(qt) == "nvfp4-pack-quantized":
        args["strategy"] = "tensor_group"
    return args


def encode_layer(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """The layer's tensors by suffix (``weight_packed``, ``weight_scale``, ...), torch layout ``[out, in]``.
    Raises `NotExportable` if compressed-tensors cannot hold it exactly."""
    reason = why_not_exportable(qt)
    if reason is not None:
        raise NotExportable(reason)
    fmt = qt.format
    qt = qt.with_float_scales() if qt.integer_scales else qt  # integer group scales: their exact float32 products
    codes = np.asarray(packing.unpack(qt.codes, fmt.bits, qt.in_features)).T  # (out, in)
    scale = np.asarray(qt.scale).T  # (out, groups)
    out = {"weight_shape": np.asarray([qt.out_features, qt.in_features], np.int64)}
    if fmt.is_int:
        out["weight_packed"] = pack_rows_int32(codes, fmt.bits)
        out["weight_scale"] = np.ascontiguousarray(scale)
        if qt.asym:
            zero = np.asarray(qt.zero).T  # (out, groups), packed along the output axis
            out["weight_zero_point"] = np.ascontiguousarray(pack_rows_int32(zero.T, fmt.bits).T)
        return out
    out["weight_packed"] = pack_nibbles(fp4_nibbles(_padded_even(codes)))
    if qt.scale_dtype == "float8_e4m3fn":
        out["weight_scale"] = np.ascontiguousarray(scale)  # float8_e4m3fn
        out["weight_global_scale"] = np.asarray(qt.global_scale, np.float32).reshape(1)
    else:
        out["weight_scale"] = np.ascontiguousarray(scale.view(np.uint8))  # E8M0: the exponent byte
    return out


def _padded_even(codes: np.ndarray) -> np.ndarray:
    """An odd ``in`` gets one zero code (+0: code 8) so nibbles pair up; weight_shape keeps the true width."""
    if codes.shape[1] % 2 == 0:
        return codes
    return np.concatenate([codes, np.full((codes.shape[0], 1), 8, codes.dtype)], axis=1)


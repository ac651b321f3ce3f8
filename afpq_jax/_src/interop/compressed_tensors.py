"""One packed layer in compressed-tensors' on-disk form (vllm-project/compressed-tensors, read by vLLM and
transformers): the tensors of a ``Linear`` and the ``weights`` scheme of its config group.

Layouts (`shared/interop.md`; checked against compressed-tensors 0.20.1's compressors and vLLM 0.34's loader):

* ``pack-quantized`` (INT, sym or asym, 2/3/4/8-bit, group or channel): ``weight_packed`` int32
  ``[out, ceil(in·b/32)]``, element ``i`` of a row at bits ``i·b`` of the row's bit string, LSB first (dense:
  since 0.18 3-bit codes straddle words; 0.17 and earlier put 10 a word); ``weight_scale`` ``[out, groups]`` in
  the checkpoint's float dtype (loaders read it in that dtype, so the scales must be exact in it);
  ``weight_shape`` int64 ``[out, in]``; asym: ``weight_zero_point`` ``[ceil(out·b/32), groups]``, packed the same
  way along the output axis. Codes and zero points are stored offset by ``2^(b-1)`` from compressed-tensors'
  signed values, which makes them exactly our unsigned codes and zero points (sym: our implicit ``2^(b-1)``).
* ``nvfp4-pack-quantized`` (FP4 E2M1, sym, groups of 16, float8_e4m3fn scales, a float32 global scale):
  ``weight_packed`` uint8 ``[out, in/2]``, element ``2j`` in the low nibble, nibble = sign·8 + the index of its
  magnitude in {0, .5, 1, 1.5, 2, 3, 4, 6}; ``weight_scale`` float8_e4m3fn ``[out, in/16]``;
  ``weight_global_scale`` float32 ``[1]``; dequantization ``fp4 · (scale / global_scale)``. No ``weight_shape``
  (vLLM has no parameter for it), so ``in`` must be whole groups.
* ``mxfp4-pack-quantized`` (FP4 E2M1, sym, groups of 32, E8M0 scales): the same codes; ``weight_scale`` uint8, the
  biased exponent ``e`` of ``2^(e-127)``.

A layer none of them holds exactly (AFPQ's two scales, NF / FP3 code books, other scale formats) raises
`NotExportable` with the reason. `decode_layer` reads each layout back into a packed `QuantizedTensor` (also
``strategy: tensor`` INT scales, and ``weight_g_idx`` of activation-order groups, `act_order`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import CheckpointError, NotExportable
from afpq_jax._src.formats import get_format
from afpq_jax._src.interop import act_order, bitstream
from afpq_jax._src.qtensor import FLOAT_SCALE_DTYPES, QuantizedTensor

INT_BITS = (2, 3, 4, 8)
FORMATS = ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized")
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale",
            "weight_g_idx")  # a compressed Linear's weight tensors (read: every one; written: what its layout has)




def pack_rows_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values ``(R, C)`` -> int32 ``(R, ceil(C·bits/32))``: each row one dense bit string
    (`bitstream`), compressed-tensors' packing."""
    return bitstream.pack_int32(values, bits, axis=1)


def unpack_rows_int32(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_rows_int32`: int32 ``(R, W)`` -> uint8 ``(R, count)`` values."""
    return bitstream.unpack_int32(words, bits, count, axis=1)


def fp4_nibbles(codes: np.ndarray) -> np.ndarray:
    """Our FP4 E2M1 codes (indices into -6 .. -0, +0 .. 6) -> compressed-tensors' nibbles (sign·8 + magnitude
    index): +0..6 are codes 8..15 (index code - 8), -0..-6 are codes 7..0 (8 + 7 - code)."""
    c = np.asarray(codes, np.uint8)
    return np.where(c >= 8, c - 8, 15 - c).astype(np.uint8)


def fp4_codes(nibbles: np.ndarray) -> np.ndarray:
    """Inverse of `fp4_nibbles`: nibble m < 8 (+magnitude m) is code 8 + m, nibble 8 + m (-magnitude m) is
    code 7 - m."""
    n = np.asarray(nibbles, np.uint8)
    return np.where(n < 8, n + 8, 15 - n).astype(np.uint8)


def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """``(R, C)`` nibbles, C even -> uint8 ``(R, C/2)``: element 2j in the low nibble, 2j+1 in the high one."""
    n = np.asarray(nibbles, np.uint8)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).astype(np.uint8)


def why_not_exportable(qt: QuantizedTensor, dtype: str = "float32") -> str | None:
    """None if compressed-tensors holds ``qt`` exactly in a checkpoint of float ``dtype``, else the reason (one
    phrase). INT scales are read in the checkpoint's dtype (vLLM and compressed-tensors allocate them so): they
    must be exact in it."""
    if qt.codes.ndim != 2:
        return "stacked weights (export one 2-D weight per layer)"
    fmt, sd = qt.format, qt.scale_dtype
    if fmt.is_int:
        if fmt.bits not in INT_BITS:
            return f"{fmt.bits}-bit integers (pack-quantized holds {', '.join(map(str, INT_BITS))})"
        if sd not in FLOAT_SCALE_DTYPES and not qt.integer_scales:
            return f"{sd} scales on integer weights (pack-quantized takes float16/bfloat16/float32 scales)"
        if _scales_in(qt, dtype) is None:
            return (f"{sd} scales not exact in {dtype}, the dtype loaders read pack-quantized scales in (export "
                    f"with --dtype {sd if sd != 'bfloat16' else 'float32'}, or quantize with --scale-dtype {dtype})")
        return None
    if fmt.name != "fp4_e2m1":
        return f"the {fmt.name} code book (compressed-tensors holds INT and FP4 E2M1 only)"
    if qt.asym:
        return "AFPQ's two scales per group (compressed-tensors' FP4 is symmetric)"
    if sd in ("float8_e4m3fn", "float8_e8m0fnu") and qt.group_size == (16 if sd == "float8_e4m3fn" else 32):
        if qt.in_features % qt.group_size:
            return f"in_features {qt.in_features} not a multiple of the group size {qt.group_size}"
        return None
    return (f"FP4 E2M1 with {sd} scales in groups of {qt.group_size} (NVFP4: float8_e4m3fn in groups of 16; "
            "MXFP4: float8_e8m0fnu in groups of 32)")


def _scales_in(qt: QuantizedTensor, dtype: str) -> np.ndarray | None:
    """The INT layer's group scales ``(G, N)`` in ``dtype`` if that holds their exact values, else None."""
    scale = np.asarray((qt.with_float_scales() if qt.integer_scales else qt).scale)
    cast = scale.astype(dtype)
    return cast if np.array_equal(cast.astype(np.float64), scale.astype(np.float64)) else None


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
                            "symmetric": not qt.asym, "dynamic": False,
                            "actorder": None,
                            "strategy": "channel" if channel and fmt.is_int else "group",
                            "group_size": None if channel and fmt.is_int else qt.group_size}
    if layer_format(qt) == "nvfp4-pack-quantized":
        args["strategy"] = "tensor_group"
    return args


def encode_layer(qt: QuantizedTensor, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The layer's tensors by suffix (``weight_packed``, ``weight_scale``, ...), torch layout ``[out, in]``, for a
    checkpoint of float ``dtype`` (INT scales are written in it). Raises `NotExportable` if compressed-tensors
    cannot hold it exactly. (Activation-order groups are not written: compressed-tensors 0.20 and vLLM 0.34
    refuse ``actorder: "group"``; older files with ``weight_g_idx`` are read.)"""
    reason = why_not_exportable(qt, dtype)
    if reason is not None:
        raise NotExportable(reason)
    fmt = qt.format
    codes = np.asarray(packing.unpack(qt.codes, fmt.bits, qt.in_features)).T  # (out, in)
    scale = np.asarray(qt.scale).T  # (out, groups)
    out = {}
    if fmt.is_int:  # (FP4 layers carry no weight_shape: vLLM's loader has no parameter for it)
        out["weight_shape"] = np.asarray([qt.out_features, qt.in_features], np.int64)
        out["weight_packed"] = pack_rows_int32(codes, fmt.bits)
        out["weight_scale"] = np.ascontiguousarray(_scales_in(qt, dtype).T)
        if qt.asym:
            zero = np.asarray(qt.zero).T  # (out, groups), packed along the output axis
            out["weight_zero_point"] = np.ascontiguousarray(pack_rows_int32(zero.T, fmt.bits).T)
        return out
    out["weight_packed"] = pack_nibbles(fp4_nibbles(codes))
    if qt.scale_dtype == "float8_e4m3fn":
        out["weight_scale"] = np.ascontiguousarray(scale)  # float8_e4m3fn
        out["weight_global_scale"] = np.asarray(qt.global_scale, np.float32).reshape(1)
    else:
        out["weight_scale"] = np.ascontiguousarray(scale.view(np.uint8))  # E8M0: the exponent byte
    return out



def input_activations(act_bits: int | None, act_mode: str | None) -> dict[str, Any] | None:
    """The ``input_activations`` args of a layer's activation scheme: static per-tensor int8 (``input_scale``)
    or dynamic per-token int8."""
    if act_bits is None:
        return None
    return {"num_bits": act_bits, "type": "int", "symmetric": True, "dynamic": act_mode == "dynamic",
            "strategy": "token" if act_mode == "dynamic" else "tensor", "group_size": None, "actorder": None}


def quantization_config(groups: list[tuple[dict, dict | None, str, list[str]]], ignore: list[str],
                        version: str) -> dict[str, Any]:
    """config.json's ``quantization_config``: one config group per (weights, input_activations, format,
    targets); ``mixed-precision`` at the top when the groups' formats differ."""
    formats = sorted({fmt for _, _, fmt, _ in groups})
    config_groups = {f"group_{i}": {"targets": targets, "weights": weights, "input_activations": acts,
                                    "output_activations": None, "format": fmt}
                     for i, (weights, acts, fmt, targets) in enumerate(groups)}
    return {"quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "version": version, "config_groups": config_groups,
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None}


# ---- reading ------------------------------------------------------------------------------------------------

def _tensor(tensors, name: str, where: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(f"{where}: missing tensor {name}; the checkpoint is incomplete")
    a = tensors[name]
    if a.dtype.name not in dtypes or tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{where}.{name} is {a.dtype.name}{list(a.shape)}, expected "
                              f"{'/'.join(dtypes)}{list(shape)} for its quantization args")
    return a


def _group_size(args: dict, k: int, tensors, where: str) -> int | None:
    strategy = args.get("strategy")
    if strategy in ("channel", "tensor"):
        return None
    g = args.get("group_size")
    if strategy not in ("group", "tensor_group") or not isinstance(g, int) or g <= 0:
        raise CheckpointError(f"{where}: weights strategy {strategy!r} with group_size {g!r} is not readable "
                              f"(afpq-jax reads channel, tensor, group and tensor_group)")
    return g


def _int_codes(tensors, bits: int, n: int, k: int, version: str | None, where: str) -> np.ndarray:
    """The ``(out, in)`` codes of ``weight_packed``: the dense layout, or for 3-bit files of compressed-tensors
    before 0.18 its 10 codes a word (LSB first, the top 2 bits unused), told apart by shape and, where the shapes
    agree, by the config's ``version``."""
    words = tensors.get("weight_packed")
    dense, padded = -(-k * bits // 32), -(-k // (32 // bits))
    old = isinstance(version, str) and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 18)
    if bits == 3 and words is not None and words.shape == (n, padded) and (padded != dense or old):
        w = np.asarray(words, np.int32).view(np.uint32)[..., None] >> (3 * np.arange(10, dtype=np.uint32))
        return (w & 7).astype(np.uint8).reshape(n, -1)[:, :k]
    return unpack_rows_int32(_tensor(tensors, "weight_packed", where, ("int32",), (n, dense)), bits, k)


def decode_layer(tensors, args: dict, layer_format: str, *, dtype: str, where: str,
                 version: str | None = None) -> tuple[QuantizedTensor, np.ndarray | None]:
    """The packed weight of one compressed ``Linear`` (``tensors`` by suffix; ``args`` its ``weights``
    quantization args; ``layer_format`` its format; ``version`` the config's, which tells 3-bit layouts apart);
    ``dtype`` is the model's float dtype. Returns ``(qt, perm)``:
    ``perm`` None, or for an activation-order ``weight_g_idx`` the order its rows are stored in (`act_order`)."""
    if layer_format not in FORMATS:
        raise CheckpointError(f"{where}: compressed-tensors format {layer_format!r} is not readable; afpq-jax reads "
                              f"{', '.join(FORMATS)}")
    if layer_format == "pack-quantized" or "weight_shape" in tensors:
        n, k = (int(v) for v in _tensor(tensors, "weight_shape", where, ("int64", "int32"), (2,)))
    else:  # FP4 layers: two codes a byte, whole groups
        packed = tensors.get("weight_packed")
        if packed is None or packed.ndim != 2:
            raise CheckpointError(f"{where}: missing 2-D tensor weight_packed; the checkpoint is incomplete")
        n, k = packed.shape[0], 2 * packed.shape[1]
    bits = args.get("num_bits")
    g = _group_size(args, k, tensors, where)
    groups = 1 if g is None else -(-k // g)
    if layer_format == "pack-quantized":
        if args.get("type", "int") != "int" or bits not in INT_BITS:
            raise CheckpointError(f"{where}: pack-quantized with {args.get('type')} {bits}-bit weights; afpq-jax "
                                  f"reads {', '.join(map(str, INT_BITS))}-bit int")
        fmt = f"int{bits}"
        codes = _int_codes(tensors, bits, n, k, version, where)
        if args.get("strategy") == "tensor":  # one scale for the whole tensor: per-channel, the same per column
            one = _tensor(tensors, "weight_scale", where, FLOAT_SCALE_DTYPES, (1,))
            scale = np.broadcast_to(one.reshape(1, 1), (n, 1))
        else:
            scale = _tensor(tensors, "weight_scale", where, FLOAT_SCALE_DTYPES, (n, groups))
        zero = None
        if not args.get("symmetric", True):
            zp = _tensor(tensors, "weight_zero_point", where, ("int32",), (-(-n * bits // 32), scale.shape[1]))
            zero = np.ascontiguousarray(unpack_rows_int32(np.ascontiguousarray(zp.T), bits, n))  # (G, out)
        leaves = {"scale": np.ascontiguousarray(scale.T), "zero": zero}
        asym = zero is not None
    else:
        nv = layer_format == "nvfp4-pack-quantized"
        if args.get("type") != "float" or bits != 4 or not args.get("symmetric", True) or g != (16 if nv else 32):
            raise CheckpointError(f"{where}: {layer_format} needs symmetric 4-bit float weights in groups of "
                                  f"{16 if nv else 32}, the config says {args}")
        fmt, asym = "fp4_e2m1", False
        packed = _tensor(tensors, "weight_packed", where, ("uint8",), (n, -(-k // 2)))
        nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1)[:, :k]
        codes = fp4_codes(nibbles)
        if nv:
            scale = _tensor(tensors, "weight_scale", where, ("float8_e4m3fn",), (n, groups))
            gs = _tensor(tensors, "weight_global_scale", where, ("float32",), (1,))
            leaves = {"scale": np.ascontiguousarray(scale.T), "global_scale": np.asarray(gs)}
        else:
            scale = _tensor(tensors, "weight_scale", where, ("uint8",), (n, groups))
            leaves = {"scale": np.ascontiguousarray(scale.T).view(np.dtype("float8_e8m0fnu"))}
    codes = np.ascontiguousarray(codes.T)  # (in, out)
    perm = None
    if args.get("actorder") == "group" and "weight_g_idx" not in tensors:
        raise CheckpointError(f"{where}: actorder 'group' but no weight_g_idx tensor; the checkpoint is incomplete")
    expected = {"weight_packed", "weight_scale", "weight_shape"} | ({"weight_g_idx"} if g is not None else set())
    expected |= ({"weight_zero_point"} if layer_format == "pack-quantized" and not args.get("symmetric", True)
                 else {"weight_global_scale"} if layer_format == "nvfp4-pack-quantized" else set())
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(f"{where}: tensor(s) {', '.join(extra)} do not belong to a {layer_format} layer with "
                              f"these quantization args; the config and the tensors disagree")
    if "weight_g_idx" in tensors and g is not None:
        g_idx = _tensor(tensors, "weight_g_idx", where, ("int32", "int64"), (k,))
        perm = act_order.permutation(g_idx, g, f"{where}.weight_g_idx")
        codes = codes if perm is None else codes[perm]
    qt = QuantizedTensor(codes=packing.pack(codes, get_format(fmt).bits), **leaves,
                         format_name=fmt, group_size=g, asym=asym, shape=(k, n), dtype=dtype)
    try:
        qt.validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return qt, perm

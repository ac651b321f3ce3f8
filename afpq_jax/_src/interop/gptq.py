"""One packed INT layer in GPTQ's and in AWQ-GEMM's on-disk form, both directions.

GPTQ (ModelCloud/GPTQModel and AutoGPTQ; read by vLLM and transformers), ``quant_method`` "gptq", b in {2, 3, 4, 8}:

* ``qweight`` int32 ``[in·b/32, out]``, packed along the *input* axis: each column is one little-endian bit string,
  input ``i`` at bits ``b·i`` (LSB first), cut into 32-bit words. For b in {2, 4, 8} that is "row ``r`` holds
  inputs ``(32/b)·r + k`` at bits ``b·k``"; for b = 3 every 32 inputs fill 3 rows (96 bits: 10 codes, one code
  straddling the first two words, 10, one straddling the last two, 10). ``in`` must be a multiple of 32/b
  (32 for b = 3).
* ``qzeros`` int32 ``[groups, out·b/32]``: the zero points, packed the same way along the *output* axis (``out`` a
  multiple of 32/b, 32 for b = 3).
* ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]`` = ``i // group_size`` (``group_size`` = ``in``
  for per-channel, written ``-1`` in the config).
* Codes are unsigned in ``[0, 2^b)``; dequantization ``scales[g] · (q − z)`` — exactly ours (asym: our ``zero``;
  sym: our implicit zero point ``2^(b−1)``).
* ``checkpoint_format`` "gptq" (v1) stores ``z − 1`` in each ``b``-bit field of ``qzeros`` (modulo ``2^b``: the
  subtraction wraps within the field; loaders add 1 back); "gptq_v2" stores ``z``. Symmetric weights (z =
  ``2^(b−1)``) are written as v1, the format every loader reads; asymmetric ones as v2 (v1's ``z − 1`` does not
  survive a loader's add-one for ``z = 0``: GPTQModel's word-wide ``+0x11111111`` carries into the next field and
  vLLM's per-field ``+1`` reads ``2^b``). On import a v1 field is read back as ``(field + 1) mod 2^b``, the inverse
  of the writing rule.
* A ``g_idx`` that is not ``i // group_size`` (act-order / ``desc_act`` without static groups) is read into rows
  stored in group order plus the permutation the layer gathers its input by (`act_order`), and written back
  from it.

AWQ GEMM (AutoAWQ / llm-awq "gemm" version, ``quant_method`` "awq", ``zero_point`` true; read by vLLM), 4-bit only:

* ``qweight`` int32 ``[in, out/8]``, packed along the *output* axis, 8 outputs a word in the interleaved order
  `AWQ_ORDER` = (0, 2, 4, 6, 1, 3, 5, 7): the nibble at bits ``4·j`` of word ``w`` holds output
  ``8·w + AWQ_ORDER[j]``.
* ``qzeros`` int32 ``[groups, out/8]``, the same packing and order; ``scales`` float16 ``[groups, out]``; no
  ``g_idx``. Dequantization ``(q − z) · s``.

Everything here is plain numpy on one 2-D layer; a layer neither format holds exactly (FP / NF code books, AFPQ's
two scales, scales that float16 does not hold exactly, shapes the packing cannot cut) raises `NotExportable` with
the reason, and bad tensors on import raise `CheckpointError` naming the tensor, the problem and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import CheckpointError, InputError, NotExportable
from afpq_jax._src.interop import act_order, bitstream
from afpq_jax._src.qtensor import FLOAT_SCALE_DTYPES, QuantizedTensor

__all__ = [
    "AWQ_ORDER", "GPTQ_BITS", "GPTQ_FORMATS", "awq_why_not_exportable",
    "decode_awq_layer", "default_format", "decode_layer", "encode_awq_layer", "encode_layer", "gptq_pack_multiple",
    "pack_awq_cols",
    "pack_gptq_rows", "unpack_awq_cols", "unpack_gptq_rows", "why_not_exportable",
]

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ Linear's tensors (g_idx optional on import)
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds output 8·w + AWQ_ORDER[j]


# ---------------------------------------------------------------------------------------------------------
# Bit packing (pure numpy).


def gptq_pack_multiple(bits: int) -> int:
    """How many values a packed axis must come in multiples of: 32/b for b in {2, 4, 8}, 32 for b = 3 (the
    smallest count that fills whole int32 words)."""
    return 32 // math.gcd(32, bits)


def pack_gptq_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values ``(L, M)`` -> int32 ``(L·bits/32, M)``, packed along axis 0 (GPTQ's layout):
    each column is one little-endian bit string with value ``i`` at bits ``bits·i``, cut into 32-bit words (a
    3-bit value may straddle two words). ``L`` must be a multiple of `gptq_pack_multiple`."""
    v = np.asarray(values)
    n = gptq_pack_multiple(bits)
    if v.ndim != 2 or v.shape[0] % n:
        raise InputError(f"pack_gptq_rows needs a 2-D array whose row count is a multiple of {n} for {bits}-bit "
                         f"values, got shape {v.shape}")
    return bitstream.pack_int32(v, bits, axis=0)


def unpack_gptq_rows(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Inverse of `pack_gptq_rows`: int32 ``(rows·bits/32, M)`` -> uint8 ``(rows, M)``."""
    n = gptq_pack_multiple(bits)
    w32 = np.asarray(words)
    if w32.ndim != 2 or rows % n or w32.shape[0] != rows * bits // 32:
        raise InputError(f"unpack_gptq_rows: {rows} {bits}-bit values per column need rows a multiple of {n} and "
                         f"[rows·{bits}/32, M] words, got rows={rows} and words of shape {w32.shape}")
    return bitstream.unpack_int32(w32, bits, rows, axis=0)


def pack_awq_cols(values: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values ``(R, C)``, C a multiple of 8 -> int32 ``(R, C/8)`` in AWQ's interleaved order: the
    nibble at bits ``4·j`` of word ``w`` holds column ``8·w + AWQ_ORDER[j]``."""
    v = np.asarray(values)
    if v.ndim != 2 or v.shape[1] % 8:
        raise InputError(f"pack_awq_cols needs a 2-D array whose column count is a multiple of 8, got shape {v.shape}")
    v = v.astype(np.uint32).reshape(v.shape[0], -1, 8) & np.uint32(15)
    word = np.zeros(v.shape[:2], np.uint32)
    for j, col in enumerate(AWQ_ORDER):
        word |= v[:, :, col] << np.uint32(4 * j)
    return word.view(np.int32)


def unpack_awq_cols(words: np.ndarray) -> np.ndarray:
    """Inverse of `pack_awq_cols`: int32 ``(R, C/8)`` -> uint8 ``(R, C)``."""
    w = np.asarray(words).view(np.uint32)
    out = np.empty((w.shape[0], w.shape[1], 8), np.uint8)
    for j, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((w >> np.uint32(4 * j)) & np.uint32(15)).astype(np.uint8)
    return out.reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------
# Shared checks.


def _float16_scales(qt: QuantizedTensor) -> tuple[np.ndarray | None, str | None]:
    """(the group scales as float16 ``(G, N)``, None) if float16 holds them exactly, else (None, the reason).
    Integer or micro-scaled group scales are first turned into their exact float32 values (`with_float_scales`)."""
    flat = qt.with_float_scales()
    s = np.asarray(flat.scale)
    if s.dtype == np.float16:
        return s, None
    s32 = s.astype(np.float32)  # exact for bfloat16 and float32
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16)
    if np.array_equal(s16.astype(np.float32), s32):
        return s16, None
    how = "integer group scales whose float values" if qt.integer_scales else f"{qt.scale_dtype} scales that"
    return None, f"{how} float16 does not hold exactly (GPTQ and AWQ store float16 scales); quantize with " \
                 "scale_dtype='float16'"


def _layer_why_not(qt: QuantizedTensor) -> str | None:
    if qt.codes.ndim != 2:
        return "stacked weights (export one 2-D weight per layer)"
    fmt = qt.format
    if not fmt.is_int:
        return (f"the {fmt.name} code book" + (" with AFPQ's two scales" if qt.asym else "")
                + " (GPTQ and AWQ hold integer weights only)")
    return None


def _whole_groups(qt: QuantizedTensor) -> str | None:
    g = qt.effective_group_size
    if qt.in_features % g:
        return (f"in_features {qt.in_features} is not a multiple of group_size {qt.group_size} (the format's loaders "
                "need whole groups)")
    return None


def _codes(qt: QuantizedTensor) -> np.ndarray:
    return np.asarray(packing.unpack(qt.codes, qt.format.bits, qt.in_features))  # (in, out) uint8


def _zeros(qt: QuantizedTensor) -> np.ndarray:
    """The zero points ``(G, N)`` uint8: the stored ones, or the implicit ``2^(b−1)`` of symmetric weights."""
    if qt.zero is not None:
        return np.asarray(qt.zero, np.uint8)
    return np.full((qt.num_groups, qt.out_features), 2 ** (qt.format.bits - 1), np.uint8)


def _error(tensor: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{tensor}: {problem}; {fix}")


def _get(tensors: Mapping[str, Any], name: str, where: str) -> np.ndarray:
    if name not in tensors:
        raise _error(f"{where} {name}", "missing from the layer's tensors", "check the checkpoint's tensor names")
    return np.asarray(tensors[name])


def _check(tensor: np.ndarray, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...], fix: str) -> None:
    dt = jnp.dtype(tensor.dtype).name
    if dt not in dtypes:
        raise _error(name, f"dtype {dt}, expected {' or '.join(dtypes)}", fix)
    if tuple(tensor.shape) != tuple(shape):
        raise _error(name, f"shape {tuple(tensor.shape)}, expected {tuple(shape)}", fix)


def _group_size(group_size: Any, in_features: int, where: str) -> tuple[int | None, int]:
    """(our group_size, the effective group size) from a config's ``group_size`` (-1 = per-channel)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or not (
            group_size == -1 or group_size > 0):
        raise _error(f"{where} group_size", f"{group_size!r} is neither -1 (per-channel) nor a positive integer",
                     "fix the quantization config")
    if group_size == -1:
        return None, in_features
    g = min(int(group_size), in_features)
    if in_features % g:
        raise _error(f"{where} group_size", f"{group_size} does not divide in_features {in_features}",
                     "pass the layer's true in_features and the config's group_size")
    return int(group_size), g


def _in_features(in_features: Any, where: str) -> int:
    if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features <= 0:
        raise _error(f"{where} in_features", f"{in_features!r} is not a positive integer",
                     "pass the layer's input width")
    return int(in_features)


def _scale_leaf(scales: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    _check(scales, name, FLOAT_SCALE_DTYPES, shape, "store the group scales as float16 [groups, out]")
    s = scales.astype(np.float32)
    if not np.all(np.isfinite(s) & (s >= 0)):
        raise _error(name, "has negative or non-finite scales", "re-export the layer; the checkpoint is damaged")
    return scales


def _built(leaves: dict[str, Any], *, bits: int, group_size: int | None, asym: bool, shape: tuple[int, int],
           dtype: str, where: str) -> QuantizedTensor:
    try:
        qt = QuantizedTensor(**leaves, format_name=f"int{bits}", group_size=group_size, asym=asym, shape=shape,
                             dtype=jnp.dtype(dtype).name)
        qt.validate()
    except CheckpointError:
        raise
    except (InputError, TypeError) as e:
        raise CheckpointError(f"{where}: the decoded layer is invalid ({e}); check the checkpoint and the arguments") \
            from None
    return qt


# ---------------------------------------------------------------------------------------------------------
# GPTQ.


def why_not_exportable(qt: QuantizedTensor) -> str | None:
    """None if GPTQ holds ``qt`` exactly, else the reason (one phrase)."""
    reason = _layer_why_not(qt)
    if reason is not None:
        return reason
    bits = qt.format.bits
    if bits not in GPTQ_BITS:
        return f"{bits}-bit integers (GPTQ holds {', '.join(map(str, GPTQ_BITS))})"
    n = gptq_pack_multiple(bits)
    if qt.in_features % n:
        return f"in_features {qt.in_features} is not a multiple of {n} ({bits}-bit qweight packs {n} inputs at a time)"
    if qt.out_features % n:
        return (f"out_features {qt.out_features} is not a multiple of {n} ({bits}-bit qzeros packs {n} outputs at a "
                "time)")
    return _whole_groups(qt) or _float16_scales(qt)[1]


def default_format(qt: QuantizedTensor) -> str:
    """The ``checkpoint_format`` `encode_layer` writes: "gptq" (v1, stores ``z − 1``) for symmetric weights,
    "gptq_v2" (stores ``z``) for asymmetric ones, whose ``z = 0`` v1 cannot carry through a loader."""
    return "gptq_v2" if qt.asym else "gptq"


def encode_layer(qt: QuantizedTensor, *, checkpoint_format: str | None = None,
                 input_perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The layer's GPTQ tensors ``{"qweight", "qzeros", "scales", "g_idx"}`` (numpy; layout in the module
    docstring), zero points as ``checkpoint_format`` says (default: the layer's own, `default_format`; a file
    with asymmetric layers writes its symmetric ones as v2 too). ``input_perm``: the layer's rows are stored in
    activation order (`act_order`): qweight goes back to the input's order and g_idx says each row's group.
    Raises `NotExportable` if GPTQ cannot hold it exactly, or if v1 is asked for asymmetric weights."""
    reason = why_not_exportable(qt)
    if reason is not None:
        raise NotExportable(reason)
    fmt = default_format(qt) if checkpoint_format is None else checkpoint_format
    if fmt not in GPTQ_FORMATS or (fmt == "gptq" and qt.asym):
        raise InputError(f"checkpoint_format {fmt!r} cannot hold this layer; use {default_format(qt)!r}")
    bits = qt.format.bits
    scales, _ = _float16_scales(qt)
    zeros = _zeros(qt).astype(np.int64)
    if fmt == "gptq":
        zeros = (zeros - 1) % (1 << bits)  # v1: z − 1 within each field
    g = qt.effective_group_size
    return {
        "qweight": pack_gptq_rows(act_order.input_order_codes(qt, input_perm), bits),
        "qzeros": np.ascontiguousarray(pack_gptq_rows(zeros.T, bits).T),
        "scales": np.ascontiguousarray(scales),
        "g_idx": ((np.arange(qt.in_features) // g).astype(np.int32) if input_perm is None
                  else act_order.g_idx(input_perm, g)),
    }


def decode_layer(tensors: Mapping[str, np.ndarray], *, bits: int, group_size: int, sym: bool,
                 checkpoint_format: str, in_features: int, dtype: str = "float32"
                 ) -> tuple[QuantizedTensor, np.ndarray | None]:
    """A GPTQ layer's tensors (``qweight``, ``qzeros``, ``scales``, optionally ``g_idx``) -> the `QuantizedTensor`
    of format ``int{bits}``, shape ``(in_features, out)``, dequantizing to exactly what GPTQ's loaders compute.

    ``group_size`` -1 (per-channel) becomes our ``group_size`` None; ``checkpoint_format`` "gptq" (v1: zero points
    stored minus one, read back as ``(field + 1) mod 2^b``) or "gptq_v2". Scales keep their stored dtype
    (float16). ``sym`` True gives a symmetric tensor (no ``zero`` leaf) only if every zero point is the implicit
    ``2^(b−1)``; a "sym" checkpoint with other zero points is decoded as asymmetric (the data wins over the flag).
    ``sym`` False always gives an asymmetric tensor. A missing ``g_idx`` is taken as the static ``i // group_size``.
    Returns ``(qt, perm)``: ``perm`` is None for static groups; for an act-order ``g_idx`` the rows of ``qt`` are
    stored in ``perm`` order (`act_order`). Tensors of the wrong dtype or shape raise `CheckpointError`.
    """
    where = "GPTQ"
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise _error(f"{where} bits", f"{bits!r} is not one of {GPTQ_BITS}", "fix the quantization config")
    if checkpoint_format not in GPTQ_FORMATS:
        raise _error(f"{where} checkpoint_format", f"{checkpoint_format!r} is not one of {GPTQ_FORMATS}",
                     "convert the checkpoint to gptq or gptq_v2 (other GPTQ formats use other layouts)")
    k = _in_features(in_features, where)
    n = gptq_pack_multiple(bits)
    if k % n:
        raise _error(f"{where} in_features", f"{k} is not a multiple of {n}, which {bits}-bit qweight needs",
                     "pass the layer's true input width")
    ours, g = _group_size(group_size, k, where)
    groups = k // g
    qweight = _get(tensors, "qweight", where)
    if qweight.ndim != 2:
        raise _error("qweight", f"shape {qweight.shape} is not 2-D", "expected int32 [in·bits/32, out]")
    out = qweight.shape[1]
    _check(qweight, "qweight", ("int32",), (k * bits // 32, out),
           f"expected int32 [in·bits/32, out] = [{k * bits // 32}, {out}] for in_features {k} at {bits} bits: check "
           "in_features and bits")
    if out % n:
        raise _error("qweight", f"out_features {out} is not a multiple of {n}, which {bits}-bit qzeros needs",
                     "the checkpoint is not a GPTQ layer")
    qzeros = _get(tensors, "qzeros", where)
    _check(qzeros, "qzeros", ("int32",), (groups, out * bits // 32),
           f"expected int32 [groups, out·bits/32] for {groups} groups of {g}: check group_size and bits")
    scales = _scale_leaf(_get(tensors, "scales", where), "scales", (groups, out))
    perm = None
    if "g_idx" in tensors:
        g_idx = np.asarray(tensors["g_idx"])
        if not np.issubdtype(g_idx.dtype, np.integer) or g_idx.shape != (k,):
            raise _error("g_idx", f"{g_idx.dtype} {g_idx.shape}, expected int32 ({k},)",
                         "check in_features against the checkpoint")
        perm = act_order.permutation(g_idx, g, "g_idx")
    codes = unpack_gptq_rows(qweight, bits, k)
    if perm is not None:  # act-order groups: rows stored in group order, the layer gathers its input by perm
        codes = codes[perm]
    zeros = unpack_gptq_rows(np.ascontiguousarray(qzeros.T), bits, out).T
    if checkpoint_format == "gptq":
        zeros = ((zeros.astype(np.int64) + 1) % (1 << bits)).astype(np.uint8)
    asym = not (sym and np.all(zeros == 2 ** (bits - 1)))
    leaves = {"codes": packing.pack(jnp.asarray(codes), bits), "scale": jnp.asarray(scales),
              "zero": jnp.asarray(np.ascontiguousarray(zeros, np.uint8)) if asym else None}
    return _built(leaves, bits=bits, group_size=ours, asym=asym, shape=(k, out), dtype=dtype, where=where), perm


# ---------------------------------------------------------------------------------------------------------
# AWQ GEMM.


def awq_why_not_exportable(qt: QuantizedTensor) -> str | None:
    """None if AWQ-GEMM holds ``qt`` exactly, else the reason (one phrase). Symmetric int4 is exportable: its
    implicit zero point 8 is written out as AWQ's zero points."""
    reason = _layer_why_not(qt)
    if reason is not None:
        return reason
    if qt.format.bits != 4:
        return f"{qt.format.bits}-bit integers (AWQ GEMM holds 4-bit only)"
    if qt.out_features % 8:
        return f"out_features {qt.out_features} is not a multiple of 8 (AWQ packs 8 outputs a word)"
    return _whole_groups(qt) or _float16_scales(qt)[1]


def encode_awq_layer(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """The layer's AWQ-GEMM tensors ``{"qweight", "qzeros", "scales"}`` (numpy; layout in the module docstring).
    Raises `NotExportable` if AWQ cannot hold it exactly."""
    reason = awq_why_not_exportable(qt)
    if reason is not None:
        raise NotExportable(reason)
    scales, _ = _float16_scales(qt)
    return {"qweight": pack_awq_cols(_codes(qt)), "qzeros": pack_awq_cols(_zeros(qt)),
            "scales": np.ascontiguousarray(scales)}


def decode_awq_layer(tensors: Mapping[str, np.ndarray], *, group_size: int, in_features: int,
                     dtype: str = "float32") -> QuantizedTensor:
    """An AWQ-GEMM layer's tensors (``qweight``, ``qzeros``, ``scales``) -> an asymmetric int4 `QuantizedTensor`
    of shape ``(in_features, out)`` (``group_size`` -1: per-channel, our None). Scales keep their stored dtype.
    Tensors of the wrong dtype or shape raise `CheckpointError`."""
    where = "AWQ"
    k = _in_features(in_features, where)
    ours, g = _group_size(group_size, k, where)
    groups = k // g
    qweight = _get(tensors, "qweight", where)
    if qweight.ndim != 2:
        raise _error("qweight", f"shape {qweight.shape} is not 2-D", "expected int32 [in, out/8]")
    _check(qweight, "qweight", ("int32",), (k, qweight.shape[1]),
           f"expected int32 [in, out/8] with in = {k}: check in_features")
    out = qweight.shape[1] * 8
    qzeros = _get(tensors, "qzeros", where)
    _check(qzeros, "qzeros", ("int32",), (groups, out // 8),
           f"expected int32 [groups, out/8] for {groups} groups of {g}: check group_size")
    scales = _scale_leaf(_get(tensors, "scales", where), "scales", (groups, out))
    leaves = {"codes": packing.pack(jnp.asarray(unpack_awq_cols(qweight)), 4), "scale": jnp.asarray(scales),
              "zero": jnp.asarray(unpack_awq_cols(qzeros))}
    return _built(leaves, bits=4, group_size=ours, asym=True, shape=(k, out), dtype=dtype, where=where)

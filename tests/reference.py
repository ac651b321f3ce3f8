"""Independent plain-numpy reference of the quantization semantics (float64 nearest-level search).

Written from the spec, not from the JAX code: per output column and group of consecutive input rows,
xmin = min(min(x), 0), xmax = max(max(x), 0); scales are float32 products with the smallest float32 >= 1/D,
rounded toward zero into the scale dtype; each value goes to the nearest level of its side's scaled grid.
"""

from __future__ import annotations

import numpy as np

FP4 = [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
FP3 = [-4, -2, -1, 0, 1, 2, 4]
NF4 = [-1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1]
NF3 = [-1, -0.5350227355957031, -0.2469314038753510, 0, 0.1833375245332718, 0.3819939494132996,
       0.6229856610298157, 1]
CODEBOOKS = {"fp4_e2m1": (FP4, 6.0), "fp3_e2m0": (FP3, 4.0), "nf4": (NF4, 1.0), "nf3": (NF3, 1.0)}
INT_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}


def recip_up(d: float) -> np.float32:
    r = np.float32(1.0 / d)
    while float(r) < 1.0 / d:
        r = np.nextafter(r, np.float32(np.inf))
    return r


def to_scale_dtype(s: np.ndarray, dtype: str) -> np.ndarray:
    """Round non-negative float32 scales toward zero into `dtype`, returned as float32."""
    s = np.asarray(s, np.float32)
    if dtype == "float32":
        return s
    if dtype == "bfloat16":  # same exponent range as float32: dropping the low 16 bits truncates
        return (s.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float32) > s, np.nextafter(h, np.float16(0)), h)
    return h.astype(np.float32)


def micro_scale(r: np.ndarray, d: float, dtype: str, global_scale: np.float32 | None = None) -> np.ndarray:
    """The micro-scaled formats' scale of range ``r`` over divisor ``d``, as float32 (written from the specs).

    float8_e4m3fn (NVFP4): ``r / d`` (as the float32 product with recip_up(d)) times the tensor's global scale,
    clamped to 448 and rounded to the nearest E4M3 value (ml_dtypes' cast: nearest, ties to even), then times
    the global scale's float32 reciprocal. float8_e8m0fnu (OCP MX): ``2^(floor(log2 r) - floor(log2 d))`` with
    the exponent in [-126, 127]; a zero range gets 2^-126."""
    import ml_dtypes

    r = np.asarray(r, np.float32)
    if dtype == "float8_e4m3fn":
        s = (r * recip_up(d)).astype(np.float32) * np.float32(global_scale)
        q = np.minimum(s, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return (q * (np.float32(1) / np.float32(global_scale))).astype(np.float32)
    assert dtype == "float8_e8m0fnu", dtype
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(r.astype(np.float64))) - np.floor(np.log2(d))
    e = np.clip(np.where(r > 0, e, -126), -126, 127)
    return np.exp2(e).astype(np.float32)


def ref_global_scale(w: np.ndarray, fmt: str, asym: bool, group_size: int | None) -> np.float32:
    """NVFP4's per-tensor scale generalised: 448 · D / R, R the largest range (side magnitude; max - min for INT
    asym) over the groups; 1 for an all-zero weight."""
    w = np.asarray(w, np.float32)
    g = w.shape[0] if group_size is None else min(group_size, w.shape[0])
    rmax = np.float32(0)
    for start in range(0, w.shape[0], g):
        x = w[start:start + g]
        lo, hi = np.minimum(x.min(axis=0), 0), np.maximum(x.max(axis=0), 0)
        r = (hi - lo) if (fmt in INT_BITS and asym) else np.maximum(hi, -lo)
        rmax = max(rmax, np.float32(r.max()))
    return np.float32(1) if rmax == 0 else np.float32(448 * _divisor(fmt, asym)) / np.float32(rmax)


def _divisor(fmt: str, asym: bool) -> float:
    if fmt in INT_BITS:
        b = INT_BITS[fmt]
        return 2**b - 1 if asym else 2 ** (b - 1) - 1
    return CODEBOOKS[fmt][1]


def _nearest(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    d = np.abs(t[..., None] - levels)
    return levels[np.argmin(d, axis=-1)]  # argmin: ties go to the lower level


def ref_params(xmin, xmax, fmt: str, asym: bool, scale_dtype: str = "float16",
               global_scale: np.float32 | None = None) -> dict:
    """Per-group parameters from the group's min/max (arrays over columns)."""
    xmin = np.minimum(np.asarray(xmin, np.float32), 0).astype(np.float32)
    xmax = np.maximum(np.asarray(xmax, np.float32), 0).astype(np.float32)
    if scale_dtype.startswith("float8"):
        d = _divisor(fmt, asym)

        def scale(r):
            return micro_scale(r, d, scale_dtype, global_scale)
        if fmt in INT_BITS:
            b = INT_BITS[fmt]
            if asym:
                s = scale(xmax - xmin)
                safe = np.where(s > 0, s, np.float32(1))
                return {"s": s, "z": np.clip(np.round(-xmin / safe), 0, 2**b - 1), "lo": 0, "hi": 2**b - 1}
            s = scale(np.maximum(xmax, -xmin))
            return {"s": s, "z": np.zeros_like(s), "lo": -(2 ** (b - 1) - 1), "hi": 2 ** (b - 1) - 1}
        if asym:
            return {"sp": scale(xmax), "sn": scale(-xmin)}
        sp = scale(np.maximum(xmax, -xmin))
        return {"sp": sp, "sn": sp}
    if fmt in INT_BITS:
        b = INT_BITS[fmt]
        if asym:
            s = to_scale_dtype((xmax - xmin) * recip_up(2**b - 1), scale_dtype)
            safe = np.where(s > 0, s, np.float32(1))
            return {"s": s, "z": np.clip(np.round(-xmin / safe), 0, 2**b - 1), "lo": 0, "hi": 2**b - 1}
        qmax = 2 ** (b - 1) - 1
        s = to_scale_dtype(np.maximum(xmax, -xmin) * recip_up(qmax), scale_dtype)
        return {"s": s, "z": np.zeros_like(s), "lo": -qmax, "hi": qmax}
    _, d = CODEBOOKS[fmt]
    r = recip_up(d)
    if asym:
        return {"sp": to_scale_dtype(xmax * r, scale_dtype), "sn": to_scale_dtype(-xmin * r, scale_dtype)}
    sp = to_scale_dtype(np.maximum(xmax, -xmin) * r, scale_dtype)
    return {"sp": sp, "sn": sp}


def ref_round(x, p: dict, fmt: str):
    """(dequantized float32 values, side scale, near-tie flags) of values ``x`` (..., N) under params ``p``."""
    x = np.asarray(x, np.float32)
    if fmt in INT_BITS:
        s = p["s"]
        safe = np.where(s > 0, s, np.float32(1))
        t = x.astype(np.float64) / safe + p["z"]
        q = np.clip(np.ceil(t - 0.5), p["lo"], p["hi"])
        near = np.abs(t - np.floor(t) - 0.5) < 1e-5
        return (q - p["z"]).astype(np.float32) * s, np.broadcast_to(s, x.shape), near
    levels, d = CODEBOOKS[fmt]
    levels = np.asarray(levels, np.float64)
    s = np.where(x >= 0, p["sp"], p["sn"])
    safe = np.where(s > 0, s, np.float32(1)).astype(np.float64)
    t = x / safe
    mids = (levels[1:] + levels[:-1]) / 2
    near = np.min(np.abs(t[..., None] - mids), axis=-1) < 1e-5 * max(1.0, d)
    return _nearest(t, levels).astype(np.float32) * s, s, near


def ref_quantize(w: np.ndarray, fmt: str, group_size: int | None, asym: bool, scale_dtype: str = "float16",
                 global_scale: np.float32 | None = None):
    """Returns (dequantized (K, N), per-element side scale float32 (K, N), near_tie bool (K, N))."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    g = k if group_size is None else min(group_size, k)
    dq = np.zeros((k, n), np.float64)
    side_scale = np.zeros((k, n), np.float32)
    near_tie = np.zeros((k, n), bool)
    gs = None if scale_dtype != "float8_e4m3fn" else (
        ref_global_scale(w, fmt, asym, group_size) if global_scale is None else np.float32(global_scale))
    for start in range(0, k, g):
        x = w[start:start + g]
        p = ref_params(x.min(axis=0), x.max(axis=0), fmt, asym, scale_dtype, gs)
        dq[start:start + g], side_scale[start:start + g], near_tie[start:start + g] = ref_round(x, p, fmt)
    return dq, side_scale, near_tie


def ref_gptq(w: np.ndarray, h: np.ndarray, fmt: str, group_size: int, asym: bool = True, damp: float = 0.01,
             block: int = 128) -> np.ndarray:
    """Textbook GPTQ in float64 numpy (AutoGPTQ's fasterquant, no act-order), returning the dequantized kernel
    (K, N). Group parameters come from the error-updated weights at each group start."""
    wt = np.asarray(w, np.float64).T.copy()  # (N, K): columns are input features
    n, k = wt.shape
    h = np.asarray(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    out = np.zeros_like(wt)
    p = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err = np.zeros((n, i2 - i1))
        for c in range(i1, i2):
            if c % group_size == 0:
                grp = wt[:, c:c + group_size]
                p = ref_params(grp.min(axis=1), grp.max(axis=1), fmt, asym)
            q = ref_round(wt[:, c], p, fmt)[0].astype(np.float64)
            e = (wt[:, c] - q) / hinv[c, c]
            wt[:, c:i2] -= np.outer(e, hinv[c, c:i2])
            err[:, c - i1] = e
            out[:, c] = q
        wt[:, i2:] -= err @ hinv[i1:i2, i2:]
    return out.T


# Integer group scales: the largest integer level magnitude per (format, asym) — FP levels x2 (FP4) or x1 (FP3).
INT8_LEVEL_MAX = {("fp4_e2m1", True): 12, ("fp4_e2m1", False): 12, ("fp3_e2m0", True): 4, ("fp3_e2m0", False): 4}


def integer_scale_top(fmt: str, asym: bool) -> int:
    if fmt in INT_BITS:
        b = INT_BITS[fmt]
        return 127 // (2**b - 1 if asym else 2 ** (b - 1) - 1)
    return 127 // INT8_LEVEL_MAX[(fmt, asym)]


def ref_quantize_integer_scales(w: np.ndarray, fmt: str, group_size: int | None, asym: bool,
                                scale_dtype: str = "float16"):
    """Integer group scales from the spec: channel scale = the column's largest float group scale / top, rounded
    up into the scale dtype; per group (and per side for AFPQ) S = floor or ceil of scale / channel in [1, top]
    (0 for an empty side), whichever gives that side's values the smaller squared error (ties: floor); INT-asym
    recomputes the zero point for S. Returns (dequantized (K, N) float64, S {"pos"/"neg": (G, N)}, channel (N,))."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    g = k if group_size is None else min(group_size, k)
    top = integer_scale_top(fmt, asym)
    starts = list(range(0, k, g))
    params = [ref_params(w[s:s + g].min(0), w[s:s + g].max(0), fmt, asym, scale_dtype) for s in starts]
    key = "s" if fmt in INT_BITS else "sp"
    biggest = np.max([np.maximum(p[key], p.get("sn", p[key])) for p in params], axis=0)
    c32 = (biggest * recip_up(top)).astype(np.float32)
    if scale_dtype == "float32":
        channel = c32
    else:
        c = c32.astype(np.float16 if scale_dtype == "float16" else np.float32)
        channel = np.where(c.astype(np.float32) < c32, np.nextafter(c, np.float16(np.inf)), c).astype(np.float32)
    safe = np.where(channel > 0, channel, np.float32(1))

    def with_scales(p, x, pkey, s_int):
        q = dict(p)
        q[pkey] = (s_int * channel).astype(np.float32)
        if fmt not in INT_BITS and not asym:
            q["sn"] = q["sp"]
        if fmt in INT_BITS and asym:  # the zero point follows the step
            step = np.where(q["s"] > 0, q["s"], np.float32(1))
            q["z"] = np.clip(np.round(-np.minimum(x.min(0), 0) / step), 0, 2 ** INT_BITS[fmt] - 1)
        return q

    dq = np.zeros((k, n), np.float64)
    ints = {"pos": np.zeros((len(starts), n)), "neg": np.zeros((len(starts), n))}
    for gi, (start, p) in enumerate(zip(starts, params)):
        x = w[start:start + g]
        two_sided = fmt not in INT_BITS and asym
        sides = [("pos", key, x >= 0 if two_sided else np.ones_like(x, bool))]
        if two_sided:
            sides.append(("neg", "sn", x < 0))
        chosen = dict(p)
        for side, pkey, mask in sides:
            r = p[pkey] / safe
            floor, ceil = (np.where(p[pkey] > 0, np.clip(f(r), 1, top), 0) for f in (np.floor, np.ceil))
            errs = []
            for s_int in (floor, ceil):
                deq = ref_round(x, with_scales(p, x, pkey, s_int), fmt)[0]
                errs.append(np.sum(np.where(mask, (x.astype(np.float64) - deq) ** 2, 0), axis=0))
            ints[side][gi] = np.where(errs[1] < errs[0], ceil, floor)
            chosen = with_scales(chosen, x, pkey, ints[side][gi])
        dq[start:start + g] = ref_round(x, chosen, fmt)[0]
    return dq, ints, channel

"""`QuantizedTensor`: packed codes plus per-group scales, as a JAX pytree."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.errors import InputError
from afpq_jax._src import formats as formats_lib
from afpq_jax._src import packing

FLOAT_SCALE_DTYPES = ("float16", "bfloat16", "float32")
# Micro-scaled formats' scales: float8_e4m3fn under one float32 global scale per tensor (NVFP4's), float8_e8m0fnu
# (powers of two: OCP MX's shared exponent).
SCALE_DTYPES = (*FLOAT_SCALE_DTYPES, "float8_e4m3fn", "float8_e8m0fnu")
GLOBAL_SCALED = ("float8_e4m3fn",)  # scale dtypes stored under a per-tensor global scale
LEAF_NAMES = ("codes", "scale", "scale_neg", "zero", "channel_scale", "global_scale")  # array fields, pytree order


def _finite_non_negative(s):
    xp = np if isinstance(s, np.ndarray) else jnp
    s = s.astype(xp.float32)
    return xp.all(xp.isfinite(s) & (s >= 0))


def _finite_positive(s):
    xp = np if isinstance(s, np.ndarray) else jnp
    return xp.all(xp.isfinite(s) & (s > 0))


def _reduced(a, on_host, on_devices):
    """``on_host(numpy value)``, or ``on_devices(a)`` for an array split across processes (whose reduction is a
    replicated scalar every process can read)."""
    if getattr(a, "is_fully_addressable", True):
        return on_host(np.asarray(a))
    return on_devices(a)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
    """A weight ``(..., K, N)`` (Flax kernel layout, K = contraction axis) stored as packed low-bit codes.

    Leaves (arrays):
      codes:      uint8 ``(..., packing.packed_rows(K, bits), N)`` — code indices into ``format.levels``,
                  packed along K as described in `afpq_jax._src.packing`.
      scale:      ``(..., G, N)`` in ``scale_dtype`` — ``s_pos`` for asymmetric codebook formats (AFPQ), the
                  single scale for symmetric formats, the step size for asymmetric INT.
      scale_neg:  ``(..., G, N)`` — ``s_neg`` for asymmetric codebook formats, else None.
      zero:       uint8 ``(..., G, N)`` — integer zero point for asymmetric INT, else None (symmetric INT uses
                  the implicit zero point ``2**(bits-1)``).
      channel_scale: ``(..., N)`` in ``scale_dtype``, or None. When present the group scales are *integer*
                  (QServe's progressive group quantization): ``scale`` / ``scale_neg`` are uint8 multiples of the
                  column's ``channel_scale`` (a group's float scale is ``channel_scale[n] * scale[g, n]``), small
                  enough that every level times its integer scale fits int8 (`quantizer.integer_scale_max`), so
                  an int8 matmul needs no per-group float work.
      global_scale: float32 ``(..., 1)`` when the group scales are float8_e4m3fn (NVFP4's two-level scaling),
                  else None: a group's float scale is ``scale[g, n] · (1 / global_scale)`` (the stored E4M3 scales span
                  the tensor's range up to 448; `quantizer.global_scale_of`).
    Static metadata (not leaves, so it survives jit/tree round trips as part of the treedef): ``format_name``,
    ``group_size`` (None = one group per output column), ``asym``, ``shape`` (the original full shape) and
    ``dtype`` (the original dtype's name). ``G = ceil(K / group_size)``; the last group may be shorter.

    Leading axes beyond the original shape are allowed (e.g. produced by ``jax.vmap``); they must agree across
    leaves. `validate` checks all of this.
    """

    codes: jax.Array
    scale: jax.Array
    scale_neg: jax.Array | None = None
    zero: jax.Array | None = None
    channel_scale: jax.Array | None = None
    global_scale: jax.Array | None = None
    format_name: str
    group_size: int | None
    asym: bool
    shape: tuple[int, ...]
    dtype: str

    # ---- derived, static ----
    @property
    def format(self) -> formats_lib.Format:
        return formats_lib.get_format(self.format_name)

    @property
    def in_features(self) -> int:
        return self.shape[-2]

    @property
    def out_features(self) -> int:
        return self.shape[-1]

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size is None else min(self.group_size, self.in_features)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.in_features / self.effective_group_size)

    @property
    def integer_scales(self) -> bool:
        return self.channel_scale is not None

    @property
    def scale_dtype(self) -> str:
        """The storage dtype of the float scales (the channel scale's for integer group scales)."""
        return jnp.dtype((self.scale if self.channel_scale is None else self.channel_scale).dtype).name

    def float_scales(self) -> tuple[jax.Array, jax.Array | None]:
        """The group scales ``(s_pos or scale, s_neg or None)`` as float32 ``(..., G, N)``, whatever the storage
        (integer scales: times the column's channel scale, exact in float32; E4M3 scales: over the global
        scale, as NVFP4's dequantization; E8M0: the power of two)."""
        pos = self.scale.astype(jnp.float32)
        neg = None if self.scale_neg is None else self.scale_neg.astype(jnp.float32)
        if self.channel_scale is not None:
            ch = self.channel_scale.astype(jnp.float32)[..., None, :]
            pos, neg = pos * ch, None if neg is None else neg * ch
        if self.global_scale is not None:
            # times the reciprocal, rounded once (XLA rewrites a division by a broadcast scalar into this product
            # anyway, so spelling it out keeps every path and the numpy reference alike; within an ulp of the
            # quotient compressed-tensors computes)
            inv = 1.0 / self.global_scale.astype(jnp.float32)[..., None]
            pos, neg = pos * inv, None if neg is None else neg * inv
        return pos, neg

    def with_float_scales(self) -> QuantizedTensor:
        """The same weight with float32 group scales and no channel or global scale (exact: the values
        `float_scales` gives; self if the scales are already float16/bfloat16/float32 group scales)."""
        if self.channel_scale is None and self.scale_dtype in FLOAT_SCALE_DTYPES:  # (so no global scale either)
            return self
        pos, neg = self.float_scales()
        return dataclasses.replace(self, scale=pos, scale_neg=neg, channel_scale=None, global_scale=None)

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the leaves (codes incl. padding rows, scales, zero points)."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in self._leaves())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, math.prod(self.codes.shape[:-2]) * self.in_features * self.out_features)

    def _leaves(self) -> list[jax.Array]:
        return [x for x in (getattr(self, name) for name in LEAF_NAMES) if x is not None]

    def validate(self) -> None:
        """Checks the invariants above; raises ValueError naming the first broken one.

        Value checks (finite, non-negative scales; zero points in range) run only on concrete arrays.
        """
        fmt = self.format  # raises on an unknown format name
        name = f"QuantizedTensor[{self.format_name}]"
        if len(self.shape) < 2:
            raise InputError(f"{name}: shape {self.shape} must have at least 2 dims (in_features, out_features)")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise InputError(f"{name}: group_size must be a positive int or None, got {self.group_size!r}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(t) for t in ("float16", "bfloat16", "float32", "float64")):
            raise InputError(f"{name}: dtype {self.dtype!r} is not a float dtype")
        k, n = self.shape[-2:]
        lead = self.codes.shape[:-2]
        want_codes = (*lead, packing.packed_rows(k, fmt.bits), n)
        if self.codes.shape != want_codes or self.codes.dtype != jnp.uint8:
            raise InputError(f"{name}: codes must be uint8 {want_codes}, got {self.codes.dtype} {self.codes.shape}")
        if tuple(lead[len(lead) - (len(self.shape) - 2):]) != tuple(self.shape[:-2]):
            raise InputError(f"{name}: codes leading dims {lead} do not end with the original leading dims "
                             f"{self.shape[:-2]}")
        want_scale = (*lead, self.num_groups, n)
        if self.channel_scale is not None:
            if self.scale.shape != want_scale or self.scale.dtype != jnp.uint8:
                raise InputError(f"{name}: integer group scales must be uint8 {want_scale}, got {self.scale.dtype} "
                                 f"{self.scale.shape}")
            if (self.channel_scale.shape != (*lead, n)
                    or jnp.dtype(self.channel_scale.dtype).name not in FLOAT_SCALE_DTYPES):
                raise InputError(f"{name}: channel_scale must be {(*lead, n)} in one of {FLOAT_SCALE_DTYPES}, "
                                 f"got {self.channel_scale.dtype} {self.channel_scale.shape}")
        elif self.scale.shape != want_scale or jnp.dtype(self.scale.dtype).name not in SCALE_DTYPES:
            raise InputError(f"{name}: scale must be {want_scale} in one of {SCALE_DTYPES}, got "
                             f"{self.scale.dtype} {self.scale.shape}")
        needs_global = self.channel_scale is None and self.scale_dtype in GLOBAL_SCALED
        if (self.global_scale is not None) != needs_global:
            raise InputError(f"{name}: global_scale must be {'present' if needs_global else 'None'} for "
                             f"{self.scale_dtype} scales")
        if needs_global and (self.global_scale.shape != (*lead, 1) or self.global_scale.dtype != jnp.float32):
            raise InputError(f"{name}: global_scale must be float32 {(*lead, 1)}, got {self.global_scale.dtype} "
                             f"{self.global_scale.shape}")
        needs_neg = self.asym and not fmt.is_int
        needs_zero = self.asym and fmt.is_int
        if (self.scale_neg is not None) != needs_neg:
            raise InputError(f"{name}: scale_neg must be {'present' if needs_neg else 'None'} for "
                             f"asym={self.asym}")
        if (self.zero is not None) != needs_zero:
            raise InputError(f"{name}: zero must be {'present' if needs_zero else 'None'} for asym={self.asym}")
        if needs_neg and (self.scale_neg.shape != want_scale or self.scale_neg.dtype != self.scale.dtype):
            raise InputError(f"{name}: scale_neg must match scale ({self.scale.dtype} {want_scale}), got "
                             f"{self.scale_neg.dtype} {self.scale_neg.shape}")
        if needs_zero and (self.zero.shape != want_scale or self.zero.dtype != jnp.uint8):
            raise InputError(f"{name}: zero must be uint8 {want_scale}, got {self.zero.dtype} {self.zero.shape}")
        if any(isinstance(x, jax.core.Tracer) for x in self._leaves()):
            return
        # A leaf that spans several processes (multi-host conversion) cannot be read on one host: its checks
        # reduce on the devices to a replicated scalar instead (`_reduced`).
        if self.channel_scale is not None:
            top = fmt.integer_scale_max(self.asym)
            for label, s in (("scale", self.scale), ("scale_neg", self.scale_neg)):
                if s is not None and s.size and int(_reduced(s, np.max, jnp.max)) > top:
                    raise InputError(f"{name}: integer {label} exceeds {top}, the largest that keeps every "
                                     f"level x scale within int8")
        for label, s in (("scale", self.scale), ("scale_neg", self.scale_neg), ("channel_scale",
                                                                              self.channel_scale)):
            if s is not None and not bool(_reduced(s, _finite_non_negative, _finite_non_negative)):
                raise InputError(f"{name}: {label} has negative or non-finite entries")
        if self.global_scale is not None and not bool(_reduced(self.global_scale, _finite_positive,
                                                               _finite_positive)):
            raise InputError(f"{name}: global_scale has zero, negative or non-finite entries")
        if needs_zero and self.zero.size and int(_reduced(self.zero, np.max, jnp.max)) >= 2**fmt.bits:
            raise InputError(f"{name}: zero points exceed the {fmt.bits}-bit range")
        if fmt.num_codes < 2**fmt.bits and self.codes.size and int(_reduced(
                packing.unpack(self.codes, fmt.bits, k), np.max, jnp.max)) >= fmt.num_codes:
            raise InputError(f"{name}: codes index past the {fmt.num_codes}-entry code book")

    def __repr__(self) -> str:
        scheme = "asym" if self.asym else "sym"
        ints = ", integer group scales" if self.integer_scales else ""
        return (f"QuantizedTensor({self.format_name}-{scheme}, group_size={self.group_size}, shape={self.shape}, "
                f"dtype={self.dtype}, scale_dtype={self.scale_dtype}{ints}, "
                f"{self.bits_per_weight:.3f} bits/weight)")


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=list(LEAF_NAMES),
    meta_fields=["format_name", "group_size", "asym", "shape", "dtype"],
)

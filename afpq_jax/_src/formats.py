"""Number formats: the code books that weights are rounded onto.

A `Format` is data, not code: every format is a sorted table of levels plus a rule for how a group's scale(s)
map the weights onto that table. Two families share all the machinery:

* ``codebook`` formats (FP ExMy, NormalFloat): levels lie in ``[-divisor, divisor]``. A group is scaled so that
  its extreme value lands on ``+-divisor``; symmetric mode uses one scale (``max|x| / divisor``), asymmetric
  mode (AFPQ) uses ``s_pos = max(x, 0) / divisor`` for the non-negative values and ``s_neg = -min(x, 0) /
  divisor`` for the negative ones.
* ``int`` formats: ``2**bits`` unsigned codes. Asymmetric mode is min/max affine with an integer zero point
  (AutoGPTQ's rule); symmetric mode is absmax with the restricted range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``
  stored with an implicit zero point of ``2**(b-1)``.

Codes stored in a `QuantizedTensor` are indices into ``levels`` (ascending order; for FP formats ``-0`` comes
just before ``+0``), so a code is decoded with one table lookup whatever the format.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import ArgumentTypeError, InputError

Family = Literal["codebook", "int"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
    """A quantization code book.

    Invariants (checked by `validate`): ``levels`` is non-decreasing, has at most ``2**bits`` entries, contains 0,
    and for codebook formats spans exactly ``[-divisor, divisor]``.
    """

    name: str
    family: Family
    bits: int
    levels: tuple[float, ...]
    divisor: float
    description: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        lv = np.asarray(self.levels, dtype=np.float64)
        if not 1 <= self.bits <= 8:
            raise InputError(f"format {self.name!r}: bits must be in 1..8, got {self.bits}")
        if lv.size < 2 or lv.size > 2**self.bits:
            raise InputError(f"format {self.name!r}: needs 2..{2**self.bits} levels, got {lv.size}")
        if np.any(np.diff(lv) < 0):
            raise InputError(f"format {self.name!r}: levels must be sorted ascending")
        if not np.any(lv == 0):
            raise InputError(f"format {self.name!r}: levels must contain 0 so zero weights stay exact")
        if self.family == "codebook" and (lv[0] != -self.divisor or lv[-1] != self.divisor):
            raise InputError(f"format {self.name!r}: codebook levels must span [-divisor, divisor]")
        if self.family not in ("codebook", "int"):
            raise InputError(f"format {self.name!r}: unknown family {self.family!r}")

    @property
    def num_codes(self) -> int:
        return len(self.levels)

    @property
    def is_int(self) -> bool:
        return self.family == "int"

    def levels_array(self, dtype=np.float32) -> np.ndarray:
        return np.asarray(self.levels, dtype=dtype)

    def midpoints(self) -> np.ndarray:
        """Decision thresholds between neighbouring levels (float32, as used by the encoder)."""
        lv = np.asarray(self.levels, dtype=np.float64)
        return ((lv[:-1] + lv[1:]) / 2).astype(np.float32)

    def max_gap(self) -> float:
        """Largest distance between neighbouring levels: rounding error is at most half of it (times the scale)."""
        return float(np.max(np.diff(np.asarray(self.levels, dtype=np.float64))))

    def int8_multiplier(self) -> int | None:
        """The smallest m in (1, 2, 4, 8) such that every level times m is an integer of magnitude <= 127 (the
        int8 representation W8 integer matmuls use: FP4 E2M1 -> 2, FP3 E2M0 -> 1), None if there is none (NF4,
        NF3). INT formats always have one: code - 2**(bits-1) with the zero point moved the same way."""
        if self.is_int:
            return 1
        lv = np.asarray(self.levels, dtype=np.float64)
        for m in (1, 2, 4, 8):
            scaled = lv * m
            if np.all(scaled == np.round(scaled)) and np.max(np.abs(scaled)) <= 127:
                return m
        return None

    def integer_scale_max(self, asym: bool) -> int:
        """The largest integer group scale S with every ``S x`` (integer level) within int8: ``127 // L`` with L
        the largest integer level magnitude (FP4 E2M1 levels x2: 12 -> 10; INT asym ``code - zero``: 2**bits - 1,
        int4 -> 8; INT sym: 2**(bits-1) - 1, int4 -> 18). 0 where integer group scales are not possible: no int8
        representation (NF), or no room for a scale above 1 (int8)."""
        mult = self.int8_multiplier()
        if mult is None:
            return 0
        if self.is_int:
            top = 2**self.bits - 1 if asym else 2 ** (self.bits - 1) - 1
        else:
            top = int(round(float(np.max(np.abs(np.asarray(self.levels, np.float64)))) * mult))
        s = 127 // top
        return s if s >= 2 else 0

    def zero_code(self) -> int:
        """Index of the (+)0 level: the code that padding and all-zero groups use."""
        return int(np.flatnonzero(np.asarray(self.levels) == 0)[-1])


def exmy_levels(exponent_bits: int, mantissa_bits: int, bias: int | None = None, *, subnormals: bool = True
                ) -> tuple[float, ...]:
    """All values of a sign + ExMy small float with no inf/nan, sorted ascending (``-0`` before ``+0``).

    ``bias`` defaults to the IEEE-style ``2**(e-1) - 1``. With subnormals, exponent field 0 encodes
    ``2**(1 - bias) * m / 2**M``; otherwise it encodes the normal value with exponent ``-bias``.
    """
    if exponent_bits < 1 or mantissa_bits < 0:
        raise InputError(f"ExMy needs exponent_bits >= 1 and mantissa_bits >= 0, got E{exponent_bits}M{mantissa_bits}")
    if bias is None:
        bias = 2 ** (exponent_bits - 1) - 1
    mags = []
    for e, m in itertools.product(range(2**exponent_bits), range(2**mantissa_bits)):
        frac = m / 2**mantissa_bits
        if e == 0 and subnormals:
            mags.append(2.0 ** (1 - bias) * frac)
        else:
            mags.append(2.0 ** (e - bias) * (1 + frac))
    mags.sort()
    # Sign bit doubles the table; -0 sorts before +0 so the table has exactly 2**(1+E+M) entries.
    return tuple([-v for v in reversed(mags)] + mags)


def fp_format(name: str, exponent_bits: int, mantissa_bits: int, bias: int | None = None, *,
              subnormals: bool = True) -> Format:
    """A signed small-float code book ``name`` with ``exponent_bits`` / ``mantissa_bits`` (bias default
    2**(e-1) - 1; ``subnormals``) and one sign bit, e.g. ``fp_format("fp4_e2m1", 2, 1, bias=1)``."""
    levels = exmy_levels(exponent_bits, mantissa_bits, bias, subnormals=subnormals)
    return Format(name=name, family="codebook", bits=1 + exponent_bits + mantissa_bits, levels=levels,
                  divisor=max(levels), description=f"FP E{exponent_bits}M{mantissa_bits} bias "
                  f"{2 ** (exponent_bits - 1) - 1 if bias is None else bias}")


def int_format(bits: int) -> Format:
    """The ``bits``-bit integer grid 0 .. 2**bits - 1 (asymmetric with a zero point, or symmetric)."""
    # Unsigned grid; the zero point (stored or implicit) moves it onto the data.
    return Format(name=f"int{bits}", family="int", bits=bits, levels=tuple(float(i) for i in range(2**bits)),
                  divisor=float(2**bits - 1), description=f"{bits}-bit integer, asym min/max or sym absmax")


# bitsandbytes' NF4 levels and the AFPQ paper's NF3 levels, normalised to [-1, 1].
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_NF3 = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
        0.6229856610298157, 1.0)

_REGISTRY: dict[str, Format] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: Format, *aliases: str) -> Format:
    """Adds a format (and optional alias names) to the registry used by `get_format`. Its code width must be one
    the packed layout stores (`packing.plane_widths`): refused here rather than at the first quantization."""
    packing.plane_widths(fmt.bits)
    for key in (fmt.name, *aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise InputError(f"format name {key!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    for a in aliases:
        _ALIASES[a] = fmt.name
    return fmt


for _b in (2, 3, 4, 8):
    register_format(int_format(_b))
register_format(fp_format("fp4_e2m1", 2, 1, bias=1), "fp4", "e2m1")
register_format(fp_format("fp3_e2m0", 2, 0, bias=1), "fp3", "e2m0")
register_format(Format(name="nf4", family="codebook", bits=4, levels=_NF4, divisor=1.0,
                       description="NormalFloat4 (bitsandbytes)"))
register_format(Format(name="nf3", family="codebook", bits=3, levels=_NF3, divisor=1.0,
                       description="NormalFloat3 (AFPQ paper)"))


def available_formats() -> tuple[str, ...]:
    """Canonical names of the registered formats (aliases such as "fp4" resolve through `get_format`)."""
    return tuple(_REGISTRY)


def get_format(fmt: str | Format) -> Format:
    """Looks a format up by name or alias (case-insensitive); passes `Format` instances through."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise ArgumentTypeError(f"format must be a name or a Format, got {type(fmt).__name__}")
    key = fmt.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) + " (aliases: " + ", ".join(sorted(_ALIASES)) + ")"
        raise InputError(f"unknown format {fmt!r}; known formats: {known}")
    return _REGISTRY[key]

"""Checks of option values shared by the configs (methods, calibration, activation and training options): each
raises `InputError` / `ArgumentTypeError` with one line naming the option and what it takes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from afpq_jax._src.errors import ArgumentTypeError, InputError


def integer(value: Any, what: str, *, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise InputError(f"{what} must be {bound}, got {value!r}")
    return int(value)


def number(value: Any, what: str) -> float:
    """``value`` if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or \
            not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def instance(value: Any, cls: type, what: str, hint: str) -> Any:
    """``value`` if it is a ``cls``; else `ArgumentTypeError` saying what to pass (``hint``)."""
    if not isinstance(value, cls):
        raise ArgumentTypeError(f"{what} must be {hint}, got {type(value).__name__}")
    return value


def token_ids(ids: Any, what: str) -> np.ndarray:
    """``ids`` as a numpy array if it holds integers (float ids would be truncated silently)."""
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ArgumentTypeError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    return arr


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def float_dtype(value: Any, what: str = "dtype"):
    """``value`` as a jax dtype if it names one of `FLOAT_DTYPES` (the dtypes of parameters and compute)."""
    import jax.numpy as jnp
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.name not in FLOAT_DTYPES:
        raise InputError(f"{what} must be one of {FLOAT_DTYPES}, got {value!r}")
    return dt

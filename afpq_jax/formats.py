"""Public view of the number formats (code books). See `afpq_jax._src.formats` for the semantics."""

from afpq_jax._src.formats import (Format, available_formats, exmy_levels, fp_format, get_format, int_format,
                                   register_format)
from afpq_jax._src.qtensor import SCALE_DTYPES
from afpq_jax._src.scheme import PRESETS

__all__ = ["Format", "PRESETS", "SCALE_DTYPES", "available_formats", "exmy_levels", "fp_format", "get_format",
           "int_format", "register_format"]

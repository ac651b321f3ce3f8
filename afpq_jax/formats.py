"""Public view of the number formats (code books). See `afpq_jax._src.formats` for the semantics."""

from afpq_jax._src.formats import (Format, available_formats, exmy_levels, fp_format, get_format, int_format,
                                   register_format)

__all__ = ["Format", "available_formats", "exmy_levels", "fp_format", "get_format", "int_format",
           "register_format"]

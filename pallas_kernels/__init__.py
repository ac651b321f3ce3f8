"""The historical name of `afpq_jax.kernels` (the fused dequantize-matmul ops and their Pallas kernels).

Every attribute is looked up in `afpq_jax.kernels`, with a DeprecationWarning: import from there instead. The
package exports nothing of its own, so each name has one home.
"""

import warnings as _warnings

import afpq_jax.kernels as _kernels

__all__: list[str] = []


def __getattr__(name: str):
    if name == "resolve_config":  # the old alias
        name = "resolve"
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_kernels, name)  # AttributeError for names afpq_jax.kernels does not have either
    _warnings.warn(f"pallas_kernels.{name} is afpq_jax.kernels.{name}; import it from there",
                   DeprecationWarning, stacklevel=2)
    return value

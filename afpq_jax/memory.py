"""Host-memory hygiene for long conversions (glibc only; no-ops elsewhere): see `afpq_jax._src.memory`."""

from afpq_jax._src.memory import limit_malloc_arenas, release_freed_memory, trim_heap

__all__ = ["limit_malloc_arenas", "release_freed_memory", "trim_heap"]

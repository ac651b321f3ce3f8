"""Host-memory helpers used by the block-by-block driver and the CLIs."""

import gc
import weakref

from afpq_jax._src import memory


class _Node:
    def __init__(self):
        self.other = None


def test_release_freed_memory_collects_reference_cycles():
    was_enabled = gc.isenabled()
    gc.disable()  # only the explicit call may collect
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        assert alive() is not None  # a cycle survives reference counting
        memory.release_freed_memory()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()


def test_limit_malloc_arenas_is_safe_to_call_repeatedly():
    memory.limit_malloc_arenas(2)
    memory.limit_malloc_arenas(8)
    memory.release_freed_memory()

"""Host-memory helpers used by the block-by-block driver and the CLIs (`afpq_jax._src.memory`)."""

import gc
import subprocess
import sys
import textwrap
import weakref

import pytest

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


def test_frozen_old_objects_stay_alive_new_cycles_are_collected_and_all_return_on_exit():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        old_a, old_b = _Node(), _Node()
        old_a.other, old_b.other = old_b, old_a
        old = weakref.ref(old_a)
        garbage = _Node()
        garbage.other = garbage
        dead = weakref.ref(garbage)
        del garbage
        with pytest.raises(RuntimeError, match="inside"):
            with memory.old_objects_frozen():
                assert dead() is None  # garbage is collected before freezing, never frozen
                assert gc.get_freeze_count() > 0
                del old_a, old_b  # unreachable now, but frozen: not collected inside
                new_a, new_b = _Node(), _Node()
                new_a.other, new_b.other = new_b, new_a
                new = weakref.ref(new_a)
                del new_a, new_b
                memory.release_freed_memory()
                assert new() is None and old() is not None
                raise RuntimeError("inside")
        assert gc.get_freeze_count() == 0  # returned to the collector, also after an error
        memory.release_freed_memory()
        assert old() is None
    finally:
        if was_enabled:
            gc.enable()


# In a fresh process: 8 threads malloc and free at once (each contending thread gets an arena of its own unless
# the cap holds), then glibc's malloc_stats() lists the arenas on stderr.
_ARENAS = textwrap.dedent("""
    import ctypes, sys, threading
    from afpq_jax._src import memory
    if sys.argv[1] == "cap":
        memory.limit_malloc_arenas(1)
        memory.limit_malloc_arenas(1)  # calling it again is harmless
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        for _ in range(20):
            for p in [libc.malloc(4096) for _ in range(500)]:
                libc.free(p)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc.malloc_stats()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_limit_malloc_arenas_caps_the_arenas_of_contending_threads():
    def arenas(mode: str) -> int:
        r = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return sum(line.startswith("Arena ") for line in r.stderr.splitlines())

    assert arenas("cap") == 1
    assert arenas("free") > 1  # the control: without the cap the threads get arenas of their own


# In a fresh process: free a 16 MiB mapped buffer (glibc then raises its mmap threshold, so the next 8 MiB buffer
# comes from the heap), free that 8 MiB buffer below a live small one (heap-top trimming cannot return it), and
# report how many MiB of anonymous memory the free, and then `trim_heap`, gave back.
_FREED_MIB = textwrap.dedent("""
    import ctypes
    from afpq_jax._src import memory
    def anon_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("RssAnon"))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    buf = libc.malloc(8 << 20); guard = libc.malloc(64)
    ctypes.memset(buf, 1, 8 << 20)
    before = anon_mib(); libc.free(buf); after_free = anon_mib()
    memory.trim_heap(); after_trim = anon_mib()
    print(before - after_free, after_free - after_trim)
""")


@pytest.mark.skipif(memory._libc() is None, reason="glibc only")
def test_trim_heap_returns_freed_heap_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", _FREED_MIB], capture_output=True, text=True, check=True)
    by_free, by_trim = map(float, out.stdout.split())
    assert by_free < 1, f"glibc returned {by_free:.1f} MiB on free alone; the setup no longer tests trimming"
    assert by_trim > 7, f"trim_heap returned {by_trim:.1f} MiB of a freed 8 MiB heap buffer"

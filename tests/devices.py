"""Simulated CPU devices for subprocess tests."""

from __future__ import annotations


def simulated_devices(n: int) -> str:
    """XLA_FLAGS for ``n`` CPU devices. XLA's in-process collectives abort when one device thread is 40 s late at
    a rendezvous, which a loaded 2-core machine can cause (seen: an all-reduce over 4 simulated devices while
    other jobs ran); the generous limits keep such tests from flaking."""
    return (f"--xla_force_host_platform_device_count={n} --xla_cpu_collective_call_terminate_timeout_seconds=1200 "
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")

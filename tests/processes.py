"""The environment of a process a test starts: the suite's own settings (its compilation
cache, its compile flags) carried over, on the CPU, with the number of host devices the test
asks for and nothing else from the parent's XLA_FLAGS that sets them."""

from __future__ import annotations

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None, environ: dict[str, str] | None = None) -> str:
    """XLA_FLAGS for a child: the parent's flags less any host device count, plus `devices`
    host devices where given (one otherwise)."""
    env = os.environ if environ is None else environ
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT)]
    if devices is not None:
        flags.append(f"{DEVICE_COUNT}={devices}")
    return " ".join(flags)


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child process on the CPU with `devices` host devices (default one),
    `extra` added."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}

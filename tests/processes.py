"""The environment of a process a test starts: the suite's own settings (its compilation
cache, its compile flags) carried over, on the CPU, with the number of host devices the test
asks for and nothing else from the parent's XLA_FLAGS that sets them."""

from __future__ import annotations

import os

from aurora_jax.distributed import child_xla_flags


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child process on the CPU with `devices` host devices (default one),
    `extra` added."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": child_xla_flags(devices),
            **extra}

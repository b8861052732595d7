"""What the device can do, measured in this process: its copy bandwidth and matmul rate.

Every timing here is a median over repeats after one warm-up call (which compiles), with
`block_until_ready`, so it measures the device and not the dispatch queue.
"""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` runs, after one untimed run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int, device=None) -> float:
    """Bytes/s of an XLA copy of an nbytes array, counting the read and the write: the
    streaming rate a memory-bound step can hope for."""
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    copy = jax.jit(lambda a: a + 1)  # a real read and write, not an alias
    return 2 * nbytes / timed(copy, x, repeats=repeats)


def matmul_flops(n: int, dtype, repeats: int, device=None) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on random data."""
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n),
                                         jnp.float32).astype(dtype), device)
    return 2 * n ** 3 / timed(jax.jit(jnp.matmul), a, b, repeats=repeats)


def device_info() -> dict:
    """The default device and the software stack, for the report's header."""
    import flax
    import optax

    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "machine": platform.machine()}

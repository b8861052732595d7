"""The persistent XLA compilation cache that every long command uses.

A compiled device program is written to disk keyed by its HLO, the compiler options and the
jax/jaxlib version, and loaded instead of compiled the next time any process builds the same
program: a server's second start, the next `run`, a test suite's next engine. On 2 CPU cores
SmolLM2's prefill, insert and step programs cost tens of seconds to compile and well under
one to load.

Where it lives, first match wins:
- `$AURORA_JAX_COMPILE_CACHE`: a directory, or `off` (also `0`, `false`, `no`) for none;
- `$JAX_COMPILATION_CACHE_DIR`, JAX's own setting, left to JAX as it is;
- `<cache root>/jax-compile` (`$AURORA_JAX_CACHE` or ~/.cache/aurora-jax, beside the built-in
  models).

Only programs that took at least `min_compile_s` to compile are written (JAX's own threshold,
`$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, wins where set). The folder is not pruned
(JAX's default): delete it at any time, or set `$JAX_COMPILATION_CACHE_MAX_SIZE` (bytes) for
JAX's least-recently-used eviction, in every process that shares the folder (one process that
evicts cannot read the entries of one that does not: they lack the access times it keeps).

This module imports nothing heavy: `tests/conftest.py` reads `directory()` before jax is
imported, so every process the suite starts inherits the same cache through the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV = "AURORA_JAX_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")


def directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache folder the environment asks for (None: the cache is off)."""
    env = os.environ if environ is None else environ
    setting = env.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    from aurora_jax.builtin import ENV_CACHE

    root = env.get(ENV_CACHE)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "aurora-jax") \
        / "jax-compile"


def enable(environ: Mapping[str, str] | None = None, *, min_compile_s: float = 0.5) -> Path | None:
    """Points JAX's persistent cache at `directory()`, before anything compiles; returns it
    (None when switched off). A folder that cannot be made leaves the cache off with a
    warning: it only costs time."""
    import logging

    import jax

    env = os.environ if environ is None else environ
    path = directory(env)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.getLogger(__name__).warning(
            "compilation cache off: cannot make %s (%s); set %s to another folder or off",
            path, e, ENV)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return path

"""Where the built-in targets live: `--cache-dir`, else $AURORA_JAX_CACHE, else
~/.cache/aurora-jax, one folder per model, each prepared under a lock."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ENV_CACHE = "AURORA_JAX_CACHE"


def default_cache_dir() -> Path:
    """$AURORA_JAX_CACHE if set, else ~/.cache/aurora-jax."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aurora-jax"


def cache_root(cache_dir: str | Path | None) -> Path:
    """`cache_dir`, or the default cache."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


@contextlib.contextmanager
def cache_lock(root: Path):
    """An exclusive lock on a model's cache folder, so two commands never prepare it at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

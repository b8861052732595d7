"""Where stores live: a tensorstore kvstore, named by a URL or a local path.

The trace store (store/trace_store.py) and the draft publications (store/draft_store.py) keep
everything in a kvstore, so an engine and a learner on different hosts need a bucket between
them, not a shared filesystem. A location is one of

    work, /data/work      a local directory (the same as file:///abs/path/to/work)
    file:///data/work     the same, as a URL
    gs://bucket/work      Google Cloud Storage
    s3://bucket/work      Amazon S3 or a compatible store
    memory://work         this process's memory (every open in the process sees the same keys)

Only what every kvstore offers is used: whole-key reads and writes (each atomic), listing and
deleting a prefix, zarr3 arrays over a prefix. There is no rename, so a writer makes a group
of keys visible by writing one small key last (its commit marker), and readers go by markers.
Tensorstore reports failures as ValueError; here every failed operation raises `StoreError`,
an OSError that names the store and the key, so callers handle a full disk and an unreachable
bucket the same way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from aurora_jax.errors import ConfigError

SCHEMES = ("file", "gs", "s3", "memory")
Location = str | os.PathLike
"""A local path or a kvstore URL."""

# One context for the process: it is what makes every open of memory://x the same store (and
# lets every store share one cache pool and one set of cloud credentials).
_CONTEXT = ts.Context()
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")  # "gs://b", also the typo "gs:/b"


class StoreError(OSError):
    """A kvstore read, write, list or delete that failed (names the store and the key)."""


def spec(location: Location) -> dict:
    """The kvstore JSON spec of `location`, its path ending in "/" (a prefix of keys).
    Raises ConfigError naming the location for an unsupported or malformed URL."""
    text = os.fspath(location)
    m = _URL.match(text)
    if m is None:  # a plain path, relative to the working directory
        return {"driver": "file", "path": os.path.join(os.path.abspath(text), "")}
    scheme = m.group(1)
    if scheme not in SCHEMES or not text.startswith(f"{scheme}://"):
        raise ConfigError(f"{text!r} is not a store location: give a local path or a URL "
                          f"starting with {', '.join(s + '://' for s in SCHEMES)}")
    try:
        out = ts.KvStore.Spec(text).to_json()
    except ValueError as e:
        raise ConfigError(f"{text!r} is not a store location: {e}") from e
    path = out.get("path", "")
    if path and not path.endswith("/"):
        out["path"] = path + "/"
    return out


def join(location: Location, name: str) -> str:
    """The location of `name` inside `location`, in the same form (a path or a URL)."""
    spec(location)  # a typo'd scheme fails here, naming the whole URL
    text = os.fspath(location)
    if _URL.match(text) is None:
        return os.path.join(text, name)
    return (text if text.endswith("/") else text + "/") + name


def local_dir(location: Location) -> Path | None:
    """The directory of a local (file) location; None for any other kvstore."""
    s = spec(location)
    return Path(s["path"]) if s["driver"] == "file" else None


def open_store(location: Location | ts.KvStore) -> ts.KvStore:
    """The kvstore at `location` (an open one is returned as it is)."""
    if isinstance(location, ts.KvStore):
        return location
    s = spec(location)
    try:
        return ts.KvStore.open(s, context=_CONTEXT).result()
    except ValueError as e:
        raise StoreError(f"{os.fspath(location)}: cannot open ({e})") from e


def _where(store: ts.KvStore, key: str) -> str:
    return f"{store.url}{key}"


def _wait(futures: Sequence[tuple[str, Any]], store: ts.KvStore) -> list:
    """Results of (key, future) pairs; waits for every one before raising the first failure,
    so that nothing is still being written when a caller cleans up after it."""
    results, failure = [], None
    for key, fut in futures:
        try:
            results.append(fut.result())
        except ValueError as e:
            results.append(None)
            failure = failure or StoreError(f"{_where(store, key)}: {e}")
    if failure is not None:
        raise failure
    return results


def read_bytes(store: ts.KvStore, keys: Sequence[str]) -> list[bytes | None]:
    """The values of `keys` (None for a missing key), read concurrently."""
    got = _wait([(k, store.read(k)) for k in keys], store)
    return [r.value if r.state == "value" else None for r in got]


def write_bytes(store: ts.KvStore, key: str, value: bytes | None) -> None:
    """Writes one key whole (None deletes it)."""
    _wait([(key, store.write(key, value))], store)


def read_json(store: ts.KvStore, keys: Sequence[str]) -> list[Any]:
    """The JSON values of `keys` (None for a missing key); a value that is not JSON raises
    StoreError naming its key."""
    out = []
    for key, raw in zip(keys, read_bytes(store, keys), strict=True):
        try:
            out.append(None if raw is None else json.loads(raw))
        except ValueError as e:
            raise StoreError(f"{_where(store, key)}: not JSON ({e})") from e
    return out


def write_json(store: ts.KvStore, key: str, value: Any) -> None:
    write_bytes(store, key, json.dumps(value).encode())


def list_keys(store: ts.KvStore, prefix: str = "") -> list[str]:
    """Keys under `prefix` (a "directory" ending in "/", or ""), relative to it, sorted."""
    try:
        keys = (store / prefix).list().result()
    except ValueError as e:
        raise StoreError(f"{_where(store, prefix)}: cannot list ({e})") from e
    return sorted(k.decode() for k in keys)


def delete_prefix(store: ts.KvStore, prefix: str) -> None:
    """Deletes every key under `prefix` (which ends in "/")."""
    _wait([(prefix, (store / prefix).delete_range(ts.KvStore.KeyRange()))], store)


def write_arrays(store: ts.KvStore, arrays: Mapping[str, np.ndarray]) -> None:
    """Each array as a zarr3 array under its key (a prefix; replacing anything there),
    written concurrently; returns once all are written."""
    opened = _wait([(key, ts.open({"driver": "zarr3"}, kvstore=store / f"{key}/", create=True,
                                  delete_existing=True, dtype=ts.dtype(a.dtype.name),
                                  shape=a.shape, context=_CONTEXT))
                    for key, a in arrays.items()], store)
    _wait([(key, t.write(a)) for (key, a), t in zip(arrays.items(), opened, strict=True)],
          store)


def read_arrays(store: ts.KvStore, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The zarr3 arrays under `keys`, read concurrently into host memory."""
    opened = _wait([(key, ts.open({"driver": "zarr3"}, kvstore=store / f"{key}/", open=True,
                                  context=_CONTEXT)) for key in keys], store)
    got = _wait([(key, t.read()) for key, t in zip(keys, opened, strict=True)], store)
    return dict(zip(keys, got, strict=True))

"""Drafts across processes: a learner publishes numbered versions of its draft to a store and
the engine's watcher restores the newest good one in the background, then hot-swaps it.

A store is any kvstore (store/kvstore.py: a local path, file://, gs://, s3:// or memory://),
so the learner may run on another host with only a bucket between the two. Its keys:

    v<version>/draft/<leaf>/     the draft's nnx.State, one zarr3 array per leaf
    v<version>/learner/<leaf>/   the learner's training state (step, weights, optimizer
                                 moments), when published with it
    v<version>/manifest.json     written after every array, the commit: the version's meta
                                 (version, learner step, metrics, wall time) and each tree's
                                 leaves (name, shape, dtype)
    rejected/<version>.json      a version the engine rolled back, and why

A version is listed only once its manifest exists, so a learner killed mid-publication leaves
nothing the watcher would list (what it wrote is deleted when that number is written again or
the publisher prunes). A restore reads the arrays to the host and places each leaf with
`jax.device_put` on the sharding of the same leaf of the serving draft, so the engine's step
does not recompile. A version that is listed but cannot be restored (damaged or missing
arrays), does not fit the serving draft (structure, shape, dtype) or holds a non-finite value
is refused: the reason is logged and kept in `DraftWatcher.refused`, the serving draft stays,
and the watcher goes on to the next version.

Why not orbax: it reaches storage through a filesystem API (local paths and gs://, not s3://
without extra setup nor memory://) and commits by renaming a directory, which object stores
lack; a manifest written last works the same on every kvstore, with one code path.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from flax import nnx

from aurora_jax.distributed import to_host
from aurora_jax.errors import DraftRefused
from aurora_jax.models.eagle3 import draft_problem
from aurora_jax.models.sharding import place_like
from aurora_jax.store import kvstore
from aurora_jax.store.periodic import Periodic

log = logging.getLogger(__name__)

FORMAT = "aurora-jax-draft/1"
MANIFEST = "manifest.json"
REJECTED = "rejected/"
_VERSION_KEY = re.compile(r"^v(\d+)/(.*)$")

Store = kvstore.Location | ts.KvStore
"""A store's location, or the store opened (`kvstore.open_store`)."""


def _named_leaves(tree) -> dict[str, jax.Array]:
    """The leaves of `tree` by path name ("midlayer.mlp.up_proj.kernel.value"), in
    flattening order."""
    out = {jax.tree_util.keystr(p, simple=True, separator="."): x
           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    if len(out) != len(jax.tree.leaves(tree)):
        raise ValueError("two leaves of the tree have the same path name")
    return out


def _versions(keys: list[str]) -> tuple[list[int], set[int]]:
    """(committed versions ascending, every version number that has any key) of a listing."""
    committed, seen = set(), set()
    for key in keys:
        m = _VERSION_KEY.match(key)
        if m is not None:
            seen.add(int(m.group(1)))
            if m.group(2) == MANIFEST:
                committed.add(int(m.group(1)))
    return sorted(committed), seen


def list_versions(directory: Store) -> list[int]:
    """Committed draft versions in the store, ascending (a version without its manifest is
    still being written, or its writer died: never listed)."""
    return _versions(kvstore.list_keys(kvstore.open_store(directory)))[0]


def write_version(directory: Store, version: int, draft, meta: dict | None = None,
                  learner=None) -> None:
    """Writes `draft` (and `learner`, a LearnerState, when given) as `version`, manifest
    last. Checks nothing: `DraftPublisher.publish` is the checked way to publish."""
    store = kvstore.open_store(directory)
    prefix = f"v{version}/"
    kvstore.delete_prefix(store, prefix)  # what a publisher killed mid-write left of it
    trees = {"draft": draft} if learner is None else {"draft": draft, "learner": learner}
    leaves, arrays = {}, {}
    for tree_name, tree in trees.items():
        host = {k: np.asarray(jax.device_get(x)) for k, x in _named_leaves(tree).items()}
        leaves[tree_name] = [[k, list(a.shape), a.dtype.name] for k, a in host.items()]
        arrays.update({f"{prefix}{tree_name}/{k}": a for k, a in host.items()})
    kvstore.write_arrays(store, arrays)
    kvstore.write_json(store, prefix + MANIFEST, {
        "format": FORMAT, "meta": {"version": version, "time": time.time(), **(meta or {})},
        "leaves": leaves})


def delete_version(directory: Store, version: int) -> None:
    """Removes a version: its manifest first, so that it is never listed half deleted."""
    store = kvstore.open_store(directory)
    kvstore.write_bytes(store, f"v{version}/{MANIFEST}", None)
    kvstore.delete_prefix(store, f"v{version}/")


def _manifest(store: ts.KvStore, version: int) -> dict:
    (manifest,) = kvstore.read_json(store, [f"v{version}/{MANIFEST}"])
    if manifest is None:
        raise ValueError(f"version {version} is not published (no {MANIFEST})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"its {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def _read_tree(store: ts.KvStore, version: int, tree_name: str, manifest: dict, like,
               finite: bool, place: bool = True):
    """Tree `tree_name` of a version, placed like `like`: each leaf on the sharding of the
    same leaf of `like` (`place` False: host numpy arrays). Raises on any mismatch with
    `like`, on damage, and (with `finite`) on a non-finite value."""
    treedef = jax.tree.structure(like)
    want = [[k, list(x.shape), np.dtype(x.dtype).name] for k, x in _named_leaves(like).items()]
    got = manifest["leaves"][tree_name]
    if [w[0] for w in want] != [g[0] for g in got]:
        raise ValueError(f"its {tree_name} tree has other leaves than the serving one's")
    for w, g in zip(want, got, strict=True):
        if w != g:
            raise ValueError(f"its {tree_name} leaf {g[0]} has shape {tuple(g[1])} and dtype "
                             f"{g[2]}, the serving one's shape {tuple(w[1])} and dtype {w[2]}")
    keys = [f"v{version}/{tree_name}/{g[0]}" for g in got]
    arrays = kvstore.read_arrays(store, keys)
    host = []
    for key, (name, shape, dtype) in zip(keys, got, strict=True):
        a = arrays[key]
        if list(a.shape) != shape or a.dtype.name != dtype:  # arrays unlike their manifest
            raise ValueError(f"its {tree_name} leaf {name} does not match its manifest")
        if finite and not np.isfinite(a).all():
            raise ValueError(f"non-finite values in {name}")
        host.append(a)
    tree = jax.tree.unflatten(treedef, host)
    return place_like(tree, like) if place else tree


def restore_draft(directory: Store, version: int, like, place: bool = True) -> tuple:
    """(state, meta) of one version, arrays placed like `like` (`place` False: host numpy
    arrays, shaped and typed like `like`); raises on any damage or mismatch, and on a
    non-finite value."""
    store = kvstore.open_store(directory)
    manifest = _manifest(store, version)
    meta = dict(manifest["meta"])
    if meta.get("version") != version:
        raise ValueError(f"its meta names version {meta.get('version')!r}")
    return _read_tree(store, version, "draft", manifest, like, finite=True, place=place), meta


def mark_rejected(directory: Store, version: int, reason: str) -> None:
    """Records that the engine rolled `version` back (one small key, written whole)."""
    kvstore.write_json(kvstore.open_store(directory), f"{REJECTED}{version}.json",
                       {"version": version, "reason": reason, "time": time.time()})


def rejected_versions(directory: Store) -> dict[int, str]:
    """Versions the engine rolled back -> why."""
    store = kvstore.open_store(directory)
    names = [k for k in kvstore.list_keys(store, REJECTED)
             if k.endswith(".json") and k.removesuffix(".json").isdigit()]
    notes = kvstore.read_json(store, [REJECTED + k for k in names])
    return {int(k.removesuffix(".json")): (n or {}).get("reason", "")
            for k, n in zip(names, notes, strict=True)}


class DraftPublisher:
    """Learner side. `publish(state)` writes the next version synchronously (the learner's
    next step donates its buffers, so nothing may read them after publish returns); the
    newest `max_to_keep` versions are kept."""

    def __init__(self, directory: kvstore.Location, initial_state, max_to_keep: int = 3):
        self.location = os.fspath(directory)
        """Where the drafts go: a local path or a kvstore URL."""
        self.store = kvstore.open_store(directory)
        self.max_to_keep = max_to_keep
        versions = list_versions(self.store)
        self.version = versions[-1] if versions else 0
        self._initial = self._serving = initial_state
        self._rejected_seen = set(rejected_versions(self.store))

    def serving(self):
        """The draft the engine serves now, as far as this learner knows: its last publication
        (or the initial draft)."""
        return self._serving

    def resume(self) -> tuple[int, nnx.State] | None:
        """(version, state) of the newest restorable version already in the store that the
        engine did not roll back, which becomes the serving draft; None when there is none."""
        rejected = rejected_versions(self.store)
        for v in reversed(list_versions(self.store)):
            if v in rejected:  # the engine rolled it back: never train on from it
                continue
            try:
                self._serving = restore_draft(self.store, v, self._serving)[0]
                return v, self._serving
            except Exception as e:  # noqa: BLE001 (any damage: try the previous version)
                log.warning("cannot resume from draft version %d: %s", v, e)
        return None

    def take_rejections(self) -> list[tuple[int, nnx.State]]:
        """(version, draft to train on from) for each version the engine rolled back since
        the last call: the newest version it did not roll back (or the initial draft)."""
        new = sorted(set(rejected_versions(self.store)) - self._rejected_seen)
        if not new:
            return []
        self._rejected_seen.update(new)
        if self.resume() is None:
            self._serving = self._initial
        return [(v, self._serving) for v in new]

    def publish(self, state, meta: dict | None = None, learner=None) -> int:
        """Writes `state` as the next version, with the learner's whole training state
        (`learner`: its step, weights and optimizer moments) when given, so that a learner
        restarted on the store goes on exactly where this publication was made. Raises
        DraftRefused for a draft that must not serve (non-finite, zeroed, stale:
        models/eagle3.draft_problem)."""
        problem = draft_problem(state, self._serving)
        if problem is not None:
            raise DraftRefused(f"draft not published: {problem}")
        version = self.version + 1
        write_version(self.store, version, state, meta, learner)
        self.version, self._serving = version, state
        self._prune()
        return version

    def _prune(self) -> None:
        """Deletes the versions older than the newest `max_to_keep`, and below the newest
        what killed publishers left uncommitted."""
        committed, seen = _versions(kvstore.list_keys(self.store))
        keep = set(committed[-self.max_to_keep:])
        for v in sorted(seen - keep):
            if v < max(keep, default=0):
                delete_version(self.store, v)

    def restore_learner(self, version: int, like):
        """The learner state published with `version`, placed like `like` (a LearnerState);
        None when that version was published without one. Raises on damage."""
        manifest = _manifest(self.store, version)
        if "learner" not in manifest["leaves"]:
            return None
        return _read_tree(self.store, version, "learner", manifest, like, finite=False)

    def close(self) -> None:
        """Nothing to release (every publication is complete when `publish` returns)."""


class DraftWatcher:
    """Engine side: every `poll_s` seconds, offers the engines' draft channel
    (engine/channel.py) the newest version above the newest it has that restores cleanly (see
    the module docstring for what is refused). With `stage`, it offers nothing itself: it
    reads and checks the version into host memory and holds it for the serving loop, which
    has it swapped in at the same step in every process of a multi-process server
    (serve/lockstep.py)."""

    def __init__(self, channel, directory: kvstore.Location, poll_s: float = 1.0,
                 stage: bool = False):
        self.channel, self.location, self.poll_s = channel, os.fspath(directory), poll_s
        self.store = kvstore.open_store(directory)
        self.refused: dict[int, str] = {}
        self.swaps = 0
        self.stage = stage
        self._staged: tuple[int, Any] | None = None  # (version, host tree) for the loop
        self._seen = channel.version  # newest version staged
        self._serving_host = to_host(channel.serving()) if stage else None
        self._lock = threading.Lock()
        self._loop: Periodic | None = None

    def poll(self) -> int | None:
        """One look at the store; returns the version offered (staged), if any."""
        serving = self.channel.version
        if self.stage:
            serving = max(serving, self._seen)
        for v in reversed(list_versions(self.store)):
            if v <= serving:
                return None
            if v in self.refused:
                continue
            try:
                self._take(v)
            except Exception as e:  # noqa: BLE001 (refuse anything that does not restore)
                self.refused[v] = f"{type(e).__name__}: {e}"
                log.warning("refusing draft version %d from %s: %s; serving version %d stays",
                            v, self.location, self.refused[v], self.channel.serving_version)
                continue
            return v
        return None

    def _take(self, v: int) -> None:
        """Reads and checks version `v`, then offers it (with `stage`: holds it on the host
        for `take_staged`); raises what makes it unfit to serve."""
        like = self.channel.serving()
        state, _ = restore_draft(self.store, v, like, place=not self.stage)
        if self.stage:  # (an offer is checked by the channel itself: channel.offer)
            problem = draft_problem(state, self._serving_host)
            if problem is not None:
                raise DraftRefused(problem)
            with self._lock:
                self._staged, self._seen = (v, state), v
            log.info("draft version %d read; the serving loop swaps it in", v)
            return
        self.channel.offer(state, version=v)
        self.swaps += 1
        log.info("draft version %d offered to the engines", v)

    def take_staged(self) -> tuple[int, Any] | None:
        """(version, host tree) of the newest version staged since the last call, if any."""
        with self._lock:
            staged, self._staged = self._staged, None
        return staged

    def swapped(self, version: int, host_tree) -> None:
        """The serving loop swapped in a staged version (what the next one is checked
        against, e.g. for a stale publication)."""
        self.swaps += 1
        self._serving_host = host_tree

    def refuse(self, version: int, reason: str) -> None:
        """Never swaps `version` in again (the engine rolled it back), and leaves a note for
        the learner process (`rejected_versions`), which then trains on from a good draft."""
        self.refused[version] = reason
        mark_rejected(self.store, version, reason)

    def start(self) -> DraftWatcher:
        self._loop = Periodic(self.poll, self.poll_s, "aurora-draft-watcher").start()
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()

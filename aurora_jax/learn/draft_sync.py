"""Drafts across processes: a learner publishes versioned orbax checkpoints to a directory and
the engine's watcher restores the newest good one in the background, then hot-swaps it.

Directory layout (an orbax CheckpointManager whose step is the draft version):

    <drafts>/<version>/draft    the draft's nnx.State (orbax StandardSave)
    <drafts>/<version>/meta     JSON: version, learner step, metrics, wall time

Orbax writes a version under a temporary name and renames it when complete, so a learner
killed mid-save leaves nothing the watcher would list. A version that is listed but cannot be
restored (damaged files), does not fit the serving draft (structure, shape, dtype) or holds a
non-finite value is refused: the reason is logged and kept in `DraftWatcher.refused`, the
serving draft stays, and the watcher goes on to the next version.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from aurora_jax.errors import DraftRefused, SwapError
from aurora_jax.learn.periodic import Periodic
from aurora_jax.models.eagle3 import draft_problem, same_layout

log = logging.getLogger(__name__)


def _abstract(state):
    """Shapes, dtypes and shardings of `state`: restoring into it places the arrays exactly
    like the serving draft's (a different sharding would recompile the engine's step)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def list_versions(directory: str | Path) -> list[int]:
    """Committed draft versions in `directory`, ascending (temporary directories excluded)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def restore_draft(directory: str | Path, version: int, like) -> tuple:
    """(state, meta) of one version, arrays placed like `like`; raises on any damage or
    mismatch, and on a non-finite value."""
    path = Path(directory).absolute() / str(version)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        got = ckptr.restore(path, args=ocp.args.Composite(
            draft=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()))
    state, meta = got["draft"], dict(got["meta"])
    if meta.get("version") != version:
        raise ValueError(f"its meta names version {meta.get('version')!r}")
    if not same_layout(like, state):
        raise ValueError("its structure, shapes or dtypes differ from the serving draft's")
    for path_, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not np.isfinite(np.asarray(leaf)).all():
            raise ValueError(f"non-finite values in {jax.tree_util.keystr(path_)}")
    return state, meta


def _rejected_dir(directory: str | Path) -> Path:
    d = Path(directory).absolute()
    return d.with_name(d.name + ".rejected")  # beside the orbax directory, not inside it


def mark_rejected(directory: str | Path, version: int, reason: str) -> None:
    """Records that the engine rolled `version` back (one small JSON file, written whole)."""
    d = _rejected_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{version}.json.tmp"
    tmp.write_text(json.dumps({"version": version, "reason": reason, "time": time.time()}))
    tmp.replace(d / f"{version}.json")


def rejected_versions(directory: str | Path) -> dict[int, str]:
    """Versions the engine rolled back -> why."""
    d = _rejected_dir(directory)
    out = {}
    for p in d.glob("*.json") if d.is_dir() else ():
        if p.stem.isdigit():
            out[int(p.stem)] = json.loads(p.read_text()).get("reason", "")
    return out


class DraftPublisher:
    """Learner side. `publish(state)` writes the next version synchronously (the learner's
    next step donates its buffers, so nothing may read them after publish returns)."""

    def __init__(self, directory: str | Path, initial_state, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False))
        versions = list_versions(self.directory)
        self.version = versions[-1] if versions else 0
        self._initial = self._serving = initial_state
        self._rejected_seen = set(rejected_versions(self.directory))

    def serving(self):
        """The draft the engine serves now, as far as this learner knows: its last publication
        (or the initial draft)."""
        return self._serving

    def resume(self) -> tuple[int, nnx.State] | None:
        """(version, state) of the newest restorable version already in the directory that
        the engine did not roll back, which becomes the serving draft; None when there is
        none."""
        rejected = rejected_versions(self.directory)
        for v in reversed(list_versions(self.directory)):
            if v in rejected:  # the engine rolled it back: never train on from it
                continue
            try:
                self._serving = restore_draft(self.directory, v, self._serving)[0]
                return v, self._serving
            except Exception as e:  # noqa: BLE001 (any damage: try the previous version)
                log.warning("cannot resume from draft version %d: %s", v, e)
        return None

    def take_rejections(self) -> list[tuple[int, nnx.State]]:
        """(version, draft to train on from) for each version the engine rolled back since
        the last call: the newest version it did not roll back (or the initial draft)."""
        new = sorted(set(rejected_versions(self.directory)) - self._rejected_seen)
        if not new:
            return []
        self._rejected_seen.update(new)
        if self.resume() is None:
            self._serving = self._initial
        return [(v, self._serving) for v in new]

    def publish(self, state, meta: dict | None = None, learner=None) -> int:
        """Writes `state` as the next version, with the learner's whole training state
        (`learner`: its step, weights and optimizer moments) when given, so that a learner
        restarted on the directory goes on exactly where this publication was made. Raises
        DraftRefused for a draft that must not serve (non-finite, zeroed, stale:
        models/eagle3.draft_problem)."""
        problem = draft_problem(state, self._serving)
        if problem is not None:
            raise DraftRefused(f"draft not published: {problem}")
        version = self.version + 1
        items = dict(draft=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
            {"version": version, "time": time.time(), **(meta or {})}))
        if learner is not None:
            items["learner"] = ocp.args.StandardSave(learner)
        self._mgr.save(version, args=ocp.args.Composite(**items), force=True)
        self._mgr.wait_until_finished()
        self.version, self._serving = version, state
        return version

    def restore_learner(self, version: int, like):
        """The learner state published with `version`, placed like `like` (a LearnerState);
        None when that version was published without one. Raises on damage."""
        path = self.directory / str(version)
        if not (path / "learner").is_dir():
            return None
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            got = ckptr.restore(path, args=ocp.args.Composite(
                learner=ocp.args.StandardRestore(_abstract(like))))
        return got["learner"]

    def close(self) -> None:
        self._mgr.close()


class DraftWatcher:
    """Engine side: every `poll_s` seconds, swaps in the newest version above the serving one
    that restores cleanly (see the module docstring for what is refused)."""

    def __init__(self, engine, directory: str | Path, poll_s: float = 1.0):
        self.engine, self.directory, self.poll_s = engine, Path(directory).absolute(), poll_s
        self.refused: dict[int, str] = {}
        self.swaps = 0
        self._loop: Periodic | None = None

    def poll(self) -> int | None:
        """One look at the directory; returns the version swapped in, if any."""
        serving = self.engine.draft_version
        for v in reversed(list_versions(self.directory)):
            if v <= serving:
                return None
            if v in self.refused:
                continue
            try:
                state, _ = restore_draft(self.directory, v, self.engine.draft_state)
                problem = draft_problem(state, self.engine.draft_state)
                if problem is not None:
                    raise DraftRefused(problem)
                self.engine.set_draft(state, version=v)
                if self.engine.draft_version != v:
                    raise SwapError(f"the swap did not take: the engine serves version "
                                    f"{self.engine.draft_version}")
            except Exception as e:  # noqa: BLE001 (refuse anything that does not restore)
                self.refused[v] = f"{type(e).__name__}: {e}"
                log.warning("refusing draft version %d from %s: %s; serving version %d stays",
                            v, self.directory, self.refused[v], serving)
                continue
            self.swaps += 1
            log.info("serving draft version %d", v)
            return v
        return None

    def refuse(self, version: int, reason: str) -> None:
        """Never swaps `version` in again (the engine rolled it back), and leaves a note for
        the learner process (`rejected_versions`), which then trains on from a good draft."""
        self.refused[version] = reason
        mark_rejected(self.directory, version, reason)

    def start(self) -> DraftWatcher:
        self._loop = Periodic(self.poll, self.poll_s, "aurora-draft-watcher").start()
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()

"""The draft channel: the one way a draft reaches the engines, and the only caller of
`Engine.set_draft`.

Whoever has a new draft only offers it: the in-process learner (as its publisher), the store
watcher (a learner process's newest version), `/admin/draft`. `offer` checks it (same layout,
finite, not zeroed, not stale: models/eagle3.draft_problem), copies it onto the serving
draft's shardings (a learner on devices of its own, learn/placement.py) and numbers it; the
owner of the engines applies it at a step boundary (`apply`): the serving loop before each
iteration, the run job before each window, `Engine.run` before each step. A channel made
with `immediate=True` applies each offer at once (a caller that steps the engines itself,
between offers). Every draft engine over the same target takes each version together, and a
swap that did not take raises SwapError (SGLang #27718: a weight update that silently did not
land).

After a swap the version is on probation with the collapse guard (engine/guard.py): `judge`,
asked after each step, rolls a collapsed version back to the trusted draft and tells every
listener (the watcher refuses that version for good and leaves a note for the learner
process; the in-process learner trains on from the trusted draft). Version numbers never
repeat, rollbacks included. Counters and listeners give the swap metrics: how many swaps and
rollbacks, and the latency from offer to the step boundary that applied it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aurora_jax.engine.batcher import Batcher
from aurora_jax.engine.engine import Engine
from aurora_jax.engine.guard import CollapseGuard, GuardConfig, Rollback
from aurora_jax.errors import ConfigError, DraftRefused, SwapError
from aurora_jax.models.eagle3 import draft_problem, same_layout
from aurora_jax.models.sharding import place_like

log = logging.getLogger(__name__)


class DraftChannel:
    """Offers in, swaps out, for every engine in `engines` that has a draft (they share it).
    `guard` judges each swapped-in version (None: the guard's defaults)."""

    def __init__(self, *engines: Engine, guard: GuardConfig | None = None,
                 immediate: bool = True):
        self.engines = [e for e in engines if e.draft is not None]
        self.immediate = immediate
        self.swaps = 0  # versions applied (rollbacks not included)
        self.rollbacks = 0
        self.last_latency_s: float | None = None  # offer -> the step boundary that applied it
        self.on_swap: list[Callable[[int, float], None]] = []  # (version, latency_s)
        self.on_rollback: list[Callable[[Rollback], None]] = []
        self._lock = threading.Lock()
        self._pending: tuple[Any, int, float] | None = None  # (state, version, offered at)
        primary = self.engines[0] if self.engines else None
        self._last = primary.draft_version if primary else 0  # newest number handed out
        self.guard = CollapseGuard(guard or GuardConfig(),
                                   primary.last_step_draft if primary else (None, 0))
        self._judged = primary.draft_version if primary else 0

    # ---- what offerers see ----------------------------------------------------------------

    @property
    def primary(self) -> Engine:
        if not self.engines:
            raise ConfigError("these engines serve without a draft; there is nothing to swap")
        return self.engines[0]

    @property
    def version(self) -> int:
        """The newest version offered (or serving): what the next offer numbers from."""
        return max(self._last, self.primary.draft_version)

    @property
    def serving_version(self) -> int:
        return self.primary.draft_version

    def serving(self):
        """The draft the engines serve from the next step boundary on: the pending offer, or
        the draft they serve now (what a new offer is checked against, and what a learner's
        "better" policy compares its candidate with)."""
        pending = self._pending
        return pending[0] if pending is not None else self.primary.draft_state

    def offer(self, state, version: int | None = None) -> int:
        """Hands `state` to the engines as `version` (default: the next number), applied at
        the next step boundary (at once with `immediate`); returns the version. Raises
        DraftRefused for a draft that must not serve, SwapError (immediate) for a swap that
        did not take. An offer not yet applied is replaced by a newer one."""
        serving = self.serving()
        if same_layout(state, serving):  # (otherwise draft_problem says why it cannot serve)
            state = place_like(state, serving)
        problem = draft_problem(state, serving)
        if problem is not None:
            raise DraftRefused(f"draft not published: {problem}")
        with self._lock:
            version = self.version + 1 if version is None else version
            if version <= self.serving_version:
                raise DraftRefused(f"draft version {version} is not newer than the serving "
                                   f"version {self.serving_version}")
            self._last = max(self._last, version)
            self._pending = (state, version, time.perf_counter())
        if self.immediate:
            self.apply()
        return version

    def publish(self, state, meta: dict | None = None, learner=None) -> int:
        """The publisher interface of learn/online.OnlineLearner: an offer (`meta` and the
        learner's state are for publishers that persist them; here the learner lives on)."""
        return self.offer(state)

    # ---- what the owner of the engines calls, between steps -------------------------------

    def apply(self) -> int | None:
        """Swaps the pending offer in, in every draft engine; returns its version (None when
        nothing was pending)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        state, version, offered = pending
        self._set(state, version)
        latency = time.perf_counter() - offered
        self.swaps += 1
        self.last_latency_s = latency
        log.info("hot swap: serving draft version %d, %.1f ms after it was offered", version,
                 latency * 1e3)
        for listener in self.on_swap:
            listener(version, latency)
        return version

    def judge(self, batchers: dict[str, Batcher], stepped: Engine) -> Rollback | None:
        """After `stepped` stepped: hands a newly served version to the collapse guard, and
        rolls the draft back when the guard finds it collapsed (by what the draft engines'
        `batchers` counted); returns the rollback done, if any."""
        if stepped.last_step_version != self._judged:
            self._judged = stepped.last_step_version
            self.guard.swapped(stepped.last_step_draft)
        rollback = self.guard.check(batchers)
        if rollback is None:
            return None
        with self._lock:
            self._set(rollback.state, rollback.version)
        self.rollbacks += 1
        log.warning("draft version %d rolled back to version %d: %s", rollback.bad_version,
                    rollback.version, rollback.reason)
        for listener in self.on_rollback:
            listener(rollback)
        return rollback

    def _set(self, state, version: int) -> None:
        for e in self.engines:
            e.set_draft(state, version=version)
        for e in self.engines:
            if e.draft_version != version or e.draft_state is not state:
                raise SwapError(f"the swap to draft version {version} did not take: the engine "
                                f"serves version {e.draft_version}")

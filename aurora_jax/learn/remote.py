"""The online loop split across two processes that share a workdir (Aurora's disaggregated
placement: the learner need not share the engine's devices or host). A workdir is a local
directory or a kvstore URL (store/kvstore.py: file://, gs://, s3://, memory://), so the two
may run on hosts that share nothing but a bucket:

    <workdir>/traces   the engine writes finished sequences here (store/trace_store.py)
    <workdir>/drafts   the learner publishes versioned drafts here (store/draft_store.py)
    <workdir>/engine.json   the engine's speculation setting (the learner's tree size)

Engine side: a stack built with learning "workdir" (aurora_jax/stack.py) writes its traces to
the store, and a DraftWatcher offers each new good version to its draft channel. Learner side:
`run_learner(...)` follows the store into a TraceBuffer and runs the same OnlineLearner as the
in-process mode, publishing through a DraftPublisher, each draft with the learner's training
state; restarted on the same workdir (after a SIGKILL, say) it resumes from the newest
published draft the engine did not roll back, with the optimizer moments and step saved
beside it. A version the engine's collapse
guard rolled back (`<workdir>/drafts/rejected/`) sends the running learner back to the newest
good draft. Either side may die without taking the other down: a dead learner leaves the engine
serving its last good draft; a dead engine leaves the learner waiting for traces.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from aurora_jax.learn.buffer import TraceBuffer
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig, OnlineLearner
from aurora_jax.learn.optimizer import OptimizerSettings
from aurora_jax.models.eagle3 import Draft
from aurora_jax.store import kvstore
from aurora_jax.store.draft_store import DraftPublisher
from aurora_jax.store.trace_store import TraceFollower
from aurora_jax.store.workdir import ENGINE_KEY, workdir_paths

log = logging.getLogger(__name__)


def run_learner(target, draft: Draft, workdir: kvstore.Location, cfg: OnlineConfig | None = None,
                loss: LossConfig | None = None,
                optimizer: OptimizerSettings = DEFAULT_OPTIMIZER, *,
                buffer_bytes: int = 1 << 30, poll_s: float = 0.5,
                stop_ids: tuple[int, ...] | None = None,
                should_stop: Callable[[], bool] = lambda: False,
                on_progress: Callable[[OnlineLearner, TraceFollower], None] | None = None,
                ) -> OnlineLearner:
    """Trains on the traces an engine writes to `workdir` and publishes drafts there, until
    `cfg.max_steps`, `should_stop()` or a learner error; returns the (stopped) OnlineLearner.
    `stop_ids` (default: the target config's) stay in the draft vocabulary when it is
    re-chosen: pass the engine's, `Tokenizer.stop_ids(...)`."""
    cfg, loss = cfg or OnlineConfig(), loss or LossConfig()
    traces, drafts = workdir_paths(workdir)
    publisher = DraftPublisher(drafts, draft.state)
    resumed = publisher.resume()
    if resumed is not None:
        log.info("resuming from published draft version %d", resumed[0])
        draft = dataclasses.replace(draft, state=resumed[1])
    buffer = TraceBuffer(max_bytes=buffer_bytes)
    follower = TraceFollower(traces, buffer.add, poll_s).start()
    online = None
    try:
        while follower.sequences == 0 and not should_stop():  # the tree size comes from them
            time.sleep(poll_s)
        learner = Learner(draft, target, loss, optimizer)
        if resumed is not None:  # its optimizer moments and step too, where they were saved
            try:
                kept = publisher.restore_learner(resumed[0], learner.state)
            except Exception as e:  # noqa: BLE001 - the draft alone still resumes
                log.warning("draft version %d: its learner state does not restore (%s); "
                            "training on with fresh optimizer moments", resumed[0], e)
                kept = None
            if kept is not None:
                learner.state = kept
        (declared,) = kvstore.read_json(kvstore.open_store(workdir), [ENGINE_KEY])
        tree_size = (declared["tree_size"] if declared is not None
                     else follower.tree_size or 1)
        online = OnlineLearner(learner, buffer, publisher, tree_size, cfg,
                               keep_ids=(target.cfg.eos_token_ids if stop_ids is None
                                         else stop_ids))
        online.steps = int(learner.state.step)
        if should_stop():
            return online
        online.start()
        while online.running and not should_stop():
            time.sleep(poll_s)
            for bad, good in publisher.take_rejections():  # the engine's collapse guard
                online.roll_back(good, bad)
            if on_progress is not None:
                on_progress(online, follower)
        return online
    finally:  # also on Ctrl-C: the learner finishes its step (and any save) first
        if online is not None:
            online.stop()
        follower.stop()
        publisher.close()

"""The online loop split across two processes that share a workdir (Aurora's disaggregated
placement: the learner need not share the engine's devices or host). A workdir is a local
directory or a kvstore URL (learn/kvstore.py: file://, gs://, s3://, memory://), so the two
may run on hosts that share nothing but a bucket:

    <workdir>/traces   the engine writes finished sequences here (trace_store)
    <workdir>/drafts   the learner publishes versioned drafts here (draft_sync)
    <workdir>/engine.json   the engine's speculation setting (the learner's tree size)

Engine side: `shared_engine(...)` builds an Engine whose traces go to the store and starts a
DraftWatcher that swaps each new good version in. Learner side: `run_learner(...)` follows the
store into a TraceBuffer and runs the same OnlineLearner as the in-process mode, publishing
through a DraftPublisher, each draft with the learner's training state; restarted on the same
workdir (after a SIGKILL, say) it resumes from the newest published draft the engine did not
roll back, with the optimizer moments and step saved beside it. A version the engine's collapse
guard rolled back (`<workdir>/drafts/rejected/`) sends the running learner back to the newest
good draft. Either side may die without taking the other down: a dead learner leaves the engine
serving its last good draft; a dead engine leaves the learner waiting for traces.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from aurora_jax.engine.engine import Engine
from aurora_jax.errors import ConfigError
from aurora_jax.learn import kvstore
from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer
from aurora_jax.learn.draft_sync import DraftPublisher, DraftWatcher
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig, OnlineLearner
from aurora_jax.learn.optimizer import OptimizerSettings
from aurora_jax.learn.trace_store import TraceFollower, TraceStore
from aurora_jax.models.config import DtypeName
from aurora_jax.models.eagle3 import Draft

log = logging.getLogger(__name__)


ENGINE_KEY = "engine.json"


def workdir_paths(workdir: kvstore.Location) -> tuple[str, str]:
    """(traces, drafts): the two stores of a workdir, in its own form (paths or URLs);
    ConfigError for a location that is neither a path nor a supported URL."""
    return kvstore.join(workdir, "traces"), kvstore.join(workdir, "drafts")


def shared_engine(target, draft: Draft, spec, workdir: kvstore.Location, *, poll_s: float = 1.0,
                  sequences_per_shard: int = 8, stage: bool = False, **engine_kwargs):
    """(engine, store, watcher): an engine whose traces go to `workdir`/traces and whose draft
    follows `workdir`/drafts; the watcher is started (with `stage`, it only stages each new
    draft for a multi-process serving loop to swap in: learn/draft_sync.DraftWatcher). Call
    `store.flush()` (after `engine.traces.flush()`) and `watcher.stop()` when done."""
    if draft is None:
        raise ConfigError("a shared workdir needs a draft for the learner to train")
    traces, drafts = workdir_paths(workdir)
    store = TraceStore(traces, sequences_per_shard)
    # The learner's tree size is the primary setting's, whatever other engines (target-only,
    # prompt lookup) also write to the store. One key, written whole.
    kvstore.write_json(kvstore.open_store(workdir), ENGINE_KEY,
                       {"tree_size": spec.nodes + 1, "spec": dataclasses.asdict(spec)})
    engine = Engine(target, draft, spec, trace_sink=TraceAssembler(store.add), **engine_kwargs)
    watcher = DraftWatcher(engine, drafts, poll_s, stage=stage)
    watcher.poll()  # a learner that already published: start from its newest draft
    return engine, store, watcher.start()


@dataclasses.dataclass(frozen=True)
class LearnJobConfig:
    """`aurora-jax learn --workdir DIR --config YAML key=value ...`: a learner process that
    trains on the traces an engine writes to DIR (a directory or a kvstore URL) and publishes
    drafts there."""

    target: str = "builtin"
    """The engine's target: "builtin", "builtin-scratch", a checkpoint directory or a .gguf."""
    draft: str = "scratch"
    """The starting draft, the same the engine starts from: "scratch", "warm" or an EAGLE-3
    directory; a workdir with published drafts resumes from the newest."""
    draft_vocab_size: int | None = 8192
    """A scratch or warm draft's head rows (engine and learner must agree; None: all)."""
    dtype: DtypeName = "auto"
    """Parameter dtype; auto: float32 on CPU, bfloat16 on GPU/TPU (models/config.device_dtype)."""
    seed: int = 0
    """Seeds a scratch draft (the engine's must match)."""
    online: OnlineConfig = OnlineConfig()
    """Batches and publications (learn/online.py)."""
    optimizer: OptimizerSettings = OptimizerSettings()
    """AdamW and its schedule (learn/optimizer.py)."""
    loss: LossConfig = LossConfig()
    """The draft objective (learn/losses.py)."""


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

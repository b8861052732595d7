"""Online training beside the engine: a learner thread that trains on served traffic and
hot-swaps each draft the sync policy accepts into the running engine (Aurora's loop).

The engine's trace sink feeds a TraceAssembler -> TraceBuffer; the thread samples fixed-shape
batches from the buffer, steps the learner, and every `every_steps` steps considers a swap:
policy "every" publishes unconditionally; policy "better" first scores the candidate and the
serving draft on a held-out batch of the most recent traffic (simulated acceptance length)
and publishes only a candidate that is at least as good. The swap itself is one attribute
assignment in the engine, picked up at the next step boundary: no pause, no recompilation.
A failing learner step is logged and ends the thread; the engine keeps its last good draft.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import jax
import jax.numpy as jnp
from flax import nnx

from aurora_jax.engine.engine import Engine
from aurora_jax.errors import ConfigError
from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.losses import draft_loss

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """How the online learner samples and when it publishes."""

    batch_size: int = 8
    """Sequences per learner batch."""
    seq_len: int = 128
    """Positions per sequence window."""
    trees_per_seq: int = 8
    """Verified trees per sequence window (the rejected-node term's data)."""
    min_sequences: int = 4
    """Finished requests in the buffer before the first step."""
    every_steps: int = 20
    """Learner steps between publication attempts."""
    policy: str = "every"
    """"every": publish each attempt; "better": only if the candidate's simulated acceptance on
    recent traffic is at least the serving draft's."""
    max_steps: int | None = None
    """Stop after this many steps (None: until stopped)."""

    def __post_init__(self):
        if self.policy not in ("every", "better"):
            raise ConfigError(f"sync policy must be 'every' or 'better', got {self.policy!r}")
        if min(self.batch_size, self.seq_len, self.trees_per_seq, self.every_steps) < 1:
            raise ConfigError("batch_size, seq_len, trees_per_seq and every_steps must be >= 1")


class OnlineLearner:
    """Trains on what `buffer` receives (the engine must be built with
    `trace_sink=TraceAssembler(buffer.add)`, see `online_engine`); `start()`, then serve."""

    def __init__(self, engine: Engine, learner: Learner, buffer: TraceBuffer,
                 cfg: OnlineConfig = OnlineConfig()):
        if engine.draft is None or engine.traces is None:
            raise ConfigError("online learning needs an engine with a draft and a trace sink")
        self.engine, self.learner, self.buffer, self.cfg = engine, learner, buffer, cfg
        self.steps = 0
        self.published = 0
        self.rejected = 0
        self.last_metrics: dict = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        embed, head = learner.embed, learner.head
        graphdef = engine.draft.graphdef
        self._score = jax.jit(lambda state, batch: draft_loss(
            nnx.merge(graphdef, state), embed, lambda h: (h @ head).astype(jnp.float32), batch,
            learner.loss)[1]["sim_acceptance_length"])

    def start(self) -> OnlineLearner:
        self._thread = threading.Thread(target=self._run, name="aurora-learner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _batch(self):
        c = self.cfg
        return self.buffer.batch(c.batch_size, c.seq_len, c.trees_per_seq,
                                 self.engine.spec.nodes + 1)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.cfg.max_steps is not None and self.steps >= self.cfg.max_steps:
                    return
                if len(self.buffer) < self.cfg.min_sequences:
                    time.sleep(0.01)
                    continue
                self.last_metrics = self.learner.step(self._batch())
                self.steps += 1
                if self.steps % self.cfg.every_steps == 0:
                    self._maybe_publish()
        except BaseException as e:  # keep serving with the last good draft
            self.error = e
            log.exception("online learner stopped; the engine keeps draft version %d",
                          self.engine.draft_version)

    def _maybe_publish(self) -> None:
        candidate = self.learner.publish()
        if self.cfg.policy == "better":
            held_out = self._batch()
            new = float(self._score(candidate, held_out))
            old = float(self._score(self.engine.draft_state, held_out))
            if new < old:
                self.rejected += 1
                return
        self.engine.set_draft(candidate)
        self.published += 1


def online_engine(target, draft, spec, learner: Learner, cfg: OnlineConfig = OnlineConfig(),
                  buffer: TraceBuffer | None = None, **engine_kwargs):
    """An engine whose traces feed a buffer, and the OnlineLearner over both (not started)."""
    buffer = buffer or TraceBuffer()
    engine = Engine(target, draft, spec, trace_sink=TraceAssembler(buffer.add), **engine_kwargs)
    return engine, OnlineLearner(engine, learner, buffer, cfg)

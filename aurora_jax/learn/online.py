"""Online training beside the engine: a learner thread that trains on served traffic and
publishes each draft the sync policy accepts (Aurora's loop).

The thread samples fixed-shape batches from a TraceBuffer, steps the learner, and every
`every_steps` steps considers a publication: policy "every" publishes unconditionally; policy
"better" first scores the candidate and the serving draft on the newest `holdout` sequences,
which training batches never draw, and publishes only a candidate at least as good (simulated
acceptance length). Where the draft goes is the publisher's business:
- in one process (the engines' draft channel, engine/channel.py), the buffer is fed by the
  engines' trace sink and a publication is an offer that the channel swaps in at the next step
  boundary: no pause, no recompilation. The learner may train on devices of its own
  (learn/placement.py): the channel then copies the draft device to device onto the serving
  draft's shardings;
- across processes (`draft_store.DraftPublisher`), the buffer is fed by a `TraceFollower`
  over the engine's trace store and a publication is a versioned orbax checkpoint that the
  engine's `DraftWatcher` restores and swaps in.
A failing learner step is logged and ends the thread; the engine keeps its last good draft.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.errors import ConfigError, DraftRefused
from aurora_jax.learn.buffer import TraceBuffer
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.losses import draft_loss
from aurora_jax.learn.vocab_refresh import (
    TokenCounts,
    VocabRefreshConfig,
    choose_vocab,
    draft_ids,
    outside_share,
)

log = logging.getLogger(__name__)


Policy = Literal["every", "better"]
POLICIES = typing.get_args(Policy)


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
    policy: Policy = "every"
    """"every": publish each attempt; "better": only if the candidate's simulated acceptance on
    recent traffic is at least the serving draft's."""
    holdout: int = 2
    """Policy "better": the newest sequences kept out of training to compare drafts on."""
    max_steps: int | None = None
    """Stop after this many steps (None: until stopped)."""
    vocab: VocabRefreshConfig = VocabRefreshConfig()
    """Re-choosing the draft vocabulary from the served tokens, at publication attempts."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"sync policy must be 'every' or 'better', got {self.policy!r}")
        if min(self.batch_size, self.seq_len, self.trees_per_seq, self.every_steps) < 1:
            raise ConfigError("batch_size, seq_len, trees_per_seq and every_steps must be >= 1")
        if self.policy == "better" and not 0 < self.holdout < self.min_sequences:
            raise ConfigError(f"policy 'better' needs 0 < holdout < min_sequences, got holdout "
                              f"{self.holdout} and min_sequences {self.min_sequences}")

    @property
    def held_out(self) -> int:
        return self.holdout if self.policy == "better" else 0


class OnlineLearner:
    """Trains on what `buffer` receives and hands drafts to `publisher` (a `DraftChannel`
    or a `DraftPublisher`); trees of `tree_size` nodes (the engine's spec.nodes + 1) feed the
    rejected-node term; `keep_ids` (the stop tokens) stay in every draft vocabulary it
    chooses. `start()`, then serve; `stop()` when done."""

    def __init__(self, learner: Learner, buffer: TraceBuffer, publisher, tree_size: int,
                 cfg: OnlineConfig = OnlineConfig(), keep_ids: tuple[int, ...] = ()):
        self.learner, self.buffer, self.publisher, self.cfg = learner, buffer, publisher, cfg
        self.tree_size = tree_size
        self.keep_ids = tuple(keep_ids)
        self.counts = TokenCounts(learner.draft.cfg.vocab_size)
        buffer.listen(lambda seq: self.counts.add(seq.tokens))
        self.vocab_changes: list[dict] = []
        self._score_rng = np.random.default_rng(0)  # scoring never moves the training order
        self.steps = 0
        self.published = 0
        self.rejected = 0  # candidates the "better" policy kept back
        self.refused = 0  # candidates refused as unfit to serve (DraftRefused)
        self.rollbacks = 0  # published drafts the engine's collapse guard rolled back
        self._reset_to = None  # a rolled-back-to draft to train on from, at the next step
        self.last_metrics: dict = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        embed, head, graphdef = learner.embed, learner.head, learner.draft.graphdef
        self._score = jax.jit(lambda state, batch: draft_loss(
            nnx.merge(graphdef, state), embed, lambda h: (h @ head).astype(jnp.float32), batch,
            learner.loss)[1]["sim_acceptance_length"])

    def start(self) -> OnlineLearner:
        self._thread = threading.Thread(target=self._run, name="aurora-learner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the thread after its step (and any publication), then waits for the steps
        already dispatched to the devices: the interleaved schedule dispatches its last steps
        right before serving ends, and nothing must still run on them while the process tears
        JAX down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is None:  # (a failed step may have left its donated state deleted)
            jax.block_until_ready(self.learner.state)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _batch(self, held_out: bool = False):
        c = self.cfg
        return self.buffer.batch(c.batch_size, c.seq_len, c.trees_per_seq, self.tree_size,
                                 recent=c.held_out, held_out=held_out,
                                 sharding=self.learner.batch_sharding(c.batch_size))

    def roll_back(self, state, bad_version: int) -> None:
        """The engine rolled draft `bad_version` back to `state` (engine/guard.py): the next
        step trains on from `state` with fresh optimizer moments, so nothing is published
        from the state that collapsed again. Safe to call from the serving thread."""
        self.rollbacks += 1
        self._reset_to = state
        log.warning("draft version %d was rolled back; training on from the draft serving now",
                    bad_version)

    def ready(self) -> bool:
        """Enough sequences in the buffer to train (and, for "better", to hold out)."""
        return len(self.buffer) >= max(self.cfg.min_sequences, self.cfg.held_out + 1)

    def train_step(self) -> None:
        """One learner step, and a publication attempt every `every_steps` steps. The thread
        calls this in a loop; a caller that interleaves serving and learning calls it
        directly."""
        reset, self._reset_to = self._reset_to, None
        if reset is not None:
            self.learner.reset_to(reset)
        self.last_metrics = self.learner.step(self._batch())
        self.steps += 1
        if self.steps % self.cfg.every_steps == 0:
            self._maybe_publish()

    def train_steps(self, n: int) -> int:
        """Up to `n` learner steps now, if the buffer is ready; returns how many ran. The
        interleaved schedule: a serving loop calls this between requests, so on a shared CPU
        learning gets a guaranteed share instead of racing the engine for the cores."""
        done = 0
        while done < n and self.ready() and (self.cfg.max_steps is None
                                             or self.steps < self.cfg.max_steps):
            self.train_step()
            done += 1
        return done

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.cfg.max_steps is not None and self.steps >= self.cfg.max_steps:
                    return
                if not self.ready():
                    time.sleep(0.01)
                    continue
                self.train_step()
        except BaseException as e:  # keep serving with the last good draft
            self.error = e
            log.exception("online learner stopped; the engine keeps draft version %d",
                          self.publisher.version)

    def fresh_acceptance(self, newest: int) -> float:
        """Simulated acceptance of the learner's current draft on the `newest` sequences in
        the buffer, meant to be called before any step trains on them: an out-of-sample
        figure, unlike the training batches' own (which a small buffer inflates)."""
        c = self.cfg
        batch = self.buffer.batch(c.batch_size, c.seq_len, c.trees_per_seq, self.tree_size,
                                  recent=newest, held_out=True, rng=self._score_rng,
                                  sharding=self.learner.batch_sharding(c.batch_size))
        return float(self._score(self.learner.publish(), batch))

    def vocab_outside_share(self) -> float:
        """Share of the served tokens counted so far that the current draft vocabulary
        cannot propose."""
        return outside_share(self.counts.snapshot(), draft_ids(self.learner.buffers["d2t"][...]))

    def _maybe_refresh_vocab(self) -> None:
        c, dcfg = self.cfg.vocab, self.learner.draft.cfg
        counts = self.counts.snapshot()
        if (not c.enabled or counts.sum() < max(c.min_tokens, 1)
                or dcfg.draft_vocab_size == dcfg.vocab_size):  # (nothing to re-choose)
            return
        current = draft_ids(self.learner.buffers["d2t"][...])
        new = choose_vocab(counts, current, self.keep_ids)
        before, after = outside_share(counts, current), outside_share(counts, new)
        if before - after < c.min_gain:
            return
        change = self.learner.set_vocab(new)
        self.vocab_changes.append({"learner_step": self.steps, "tokens": int(counts.sum()),
                                   "outside_before": before, "outside_after": after,
                                   "entering": change.entering})
        log.info("draft vocabulary re-chosen at step %d: %d tokens enter; %.2f%% -> %.2f%% of "
                 "the served tokens outside it", self.steps, change.entering, 100 * before,
                 100 * after)

    def _maybe_publish(self) -> None:
        self._maybe_refresh_vocab()
        candidate = self.learner.publish()
        if self.cfg.policy == "better":
            held_out = self._batch(held_out=True)
            new = float(self._score(candidate, held_out))
            old = float(self._score(self.learner.place(self.publisher.serving()), held_out))
            if new < old:
                self.rejected += 1
                return
        metrics = {k: float(v) for k, v in self.last_metrics.items()}
        meta = {"learner_step": self.steps, "metrics": metrics}
        try:
            version = self.publisher.publish(candidate, meta, learner=self.learner.state)
        except DraftRefused as e:  # (a non-finite loss gets here too): train on, serve on
            self.refused += 1
            log.warning("learner step %d: %s", self.steps, e)
            return
        self.published += 1
        self.buffer.drop_stale(version)

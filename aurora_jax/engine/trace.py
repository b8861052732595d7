"""Trace records: what the engine saw at each verification step, for the learner.

A `VerifyTrace` holds one step for all slots (arrays with a leading slot axis B, as the device
produced them); `rows()` splits it into one `VerifyRecord` per sequence that was generating.
A `PrefillTrace` holds a prompt's target features (the committed prompt tokens are training
data too). The device-to-host copy starts right after the step is dispatched
(`copy_to_host_async`) and a worker thread turns the arrays into numpy and calls the consumer,
so neither the jitted step nor the serving loop waits on the learner. A consumer slower than
the engine fills a bounded queue; further traces are dropped and counted, never queued
without bound.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import weakref
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyRecord:
    """One verification step of one sequence. N+1 tree slots (slot 0 the root, the last
    committed token); R = max depth + 1 path entries (-1 past the accepted length)."""

    request_id: object
    domain: str | None
    draft_version: int
    tree_tokens: np.ndarray  # [N+1] target-vocabulary ids
    tree_parent: np.ndarray  # [N+1] parent slot, -1 for the root
    draft_logp: np.ndarray  # [N+1] draft log-prob of each node's token given its parent
    path: np.ndarray  # [R] accepted slots, root first
    num_accepted: int  # draft nodes accepted
    committed: np.ndarray  # tokens committed this step (accepted nodes, then the bonus)
    aux: np.ndarray  # [N+1, A, H] target aux hidden states at every node
    hidden: np.ndarray  # [N+1, H] target final normed hidden (lm_head gives the logits)
    done: bool  # the request finished in this step


@dataclasses.dataclass
class VerifyTrace:
    request_ids: list  # [B] request id per slot, None for an empty slot
    domains: list  # [B]
    draft_version: int
    arrays: dict  # name -> [B, ...] device or host arrays (see engine/step.py)
    active: np.ndarray  # [B]
    tokens: np.ndarray  # [B, R] committed tokens
    emitted: np.ndarray  # [B]
    accepted: np.ndarray  # [B]
    done: np.ndarray  # [B] the slot's request finished in this step

    def rows(self) -> list[VerifyRecord]:
        a = {k: np.asarray(v) for k, v in self.arrays.items()}
        out = []
        for b in np.nonzero(self.active)[0]:
            out.append(VerifyRecord(
                request_id=self.request_ids[b], domain=self.domains[b],
                draft_version=self.draft_version, tree_tokens=a["tree_tokens"][b],
                tree_parent=a["tree_parent"][b], draft_logp=a["draft_logp"][b],
                path=a["path"][b], num_accepted=int(self.accepted[b]),
                committed=self.tokens[b, : self.accepted[b] + 1], aux=a["aux"][b],
                hidden=a["hidden"][b], done=bool(self.done[b])))
        return out


@dataclasses.dataclass
class PrefillTrace:
    """A prompt's committed tokens with the target's features at each of them."""

    request_id: object
    domain: str | None
    tokens: np.ndarray  # [P] prompt ids
    first: int  # the first generated token
    aux: np.ndarray  # [P, A, H]
    hidden: np.ndarray  # [P, H]
    done: bool  # the request ended with its first token


@dataclasses.dataclass
class EndTrace:
    """A request ended before its stop token or budget (cancelled, or cut by a stop string):
    what was traced of it is all there will be."""

    request_id: object


class TraceEmitter:
    """Hands traces to `sink` on a worker thread, at most `max_pending` waiting.

    The worker holds only a weak reference to its emitter: an engine dropped without `close`
    (a test's, a benchmark's) can then be freed with its compiled programs, and the worker ends
    within a second once the emitter is gone. Traces still queued then are not delivered."""

    def __init__(self, sink: Callable[[object], None], max_pending: int = 64):
        self.sink = sink
        self.dropped = 0
        self.emitted = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=_work, args=(self._queue, weakref.ref(self)),
                                        name="aurora-traces", daemon=True)
        self._thread.start()

    def submit(self, trace) -> None:
        try:
            self._queue.put_nowait(trace)
        except queue.Full:
            self.dropped += 1

    @staticmethod
    def start_copy(arrays: dict) -> None:
        for x in jax.tree.leaves(arrays):
            x.copy_to_host_async()

    def _deliver(self, trace) -> None:
        try:
            if isinstance(trace, VerifyTrace):
                trace.arrays = {k: np.asarray(v) for k, v in trace.arrays.items()}
            self.sink(trace)
            self.emitted += 1
        except Exception:  # a failing consumer must not take the server down
            log.exception("trace consumer failed; trace dropped")
            self.dropped += 1

    def flush(self) -> None:
        """Waits until every submitted trace reached the consumer."""
        self._queue.join()

    def close(self) -> None:
        """Hands every submitted trace to the consumer, then ends the worker thread and waits
        for it; calling it again does nothing. Close before the process exits: a worker still
        inside JAX (turning a step's arrays into numpy) when the interpreter and JAX's runtime
        tear down kills the process after its last line (SIGSEGV or SIGABRT)."""
        if not self._thread.is_alive():
            return
        self.flush()
        self._queue.put(None)
        self._thread.join()


def _work(pending: queue.Queue, owner: weakref.ref) -> None:
    """The worker: delivers each trace through its emitter until `close` sends None, or until
    the emitter has been garbage collected."""
    while True:
        try:
            trace = pending.get(timeout=1.0)
        except queue.Empty:
            if owner() is None:
                return
            continue
        if trace is None:
            return
        try:
            emitter = owner()
            if emitter is not None:
                emitter._deliver(trace)
            del emitter
        finally:
            pending.task_done()

"""From engine traces to fixed-shape learner batches.

`TraceAssembler` is an engine trace sink: it stitches a request's prefill trace and its
verification records into one `TracedSequence` (committed tokens with the target's features
at each position, plus every tree the engine verified for it, anchored at its root's position) and
hands finished sequences to a `TraceBuffer`. The buffer holds them within a byte budget
(oldest dropped first, counted), drops sequences drafted by a version older than the staleness
limit (counted), and cuts random fixed-shape `LearnBatch`es, so the learner's jitted step never
sees a new shape; a batch goes from the host straight to the devices its `sharding` names (a
learner's own, learn/placement.py), never by way of the serving devices. Thread-safe: the
engine's trace thread adds while the learner samples.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.engine.trace import EndTrace, PrefillTrace, VerifyRecord, VerifyTrace
from aurora_jax.learn.losses import LearnBatch


@dataclasses.dataclass
class VerifiedTree:
    """One verified draft tree of a traced sequence, on the host (speculative/tree.Tree is the
    device-side batch of trees the engine proposes)."""

    root_pos: int  # position of the root token in the sequence
    tokens: np.ndarray  # [N+1]
    parent: np.ndarray  # [N+1]
    hidden: np.ndarray  # [N+1, H]
    accepted: np.ndarray  # [N+1] bool


@dataclasses.dataclass
class TracedSequence:
    """One served request as training data: its committed tokens with the target's features,
    and every tree the engine verified for it."""

    request_id: object
    domain: str | None
    draft_version: int  # the oldest draft version that proposed for it
    tokens: np.ndarray  # [T] committed tokens that carry features
    aux: np.ndarray  # [T, A, H]
    hidden: np.ndarray  # [T, H]
    trees: list[VerifiedTree]

    @property
    def nbytes(self) -> int:
        arrays = [self.tokens, self.aux, self.hidden]
        arrays += [a for t in self.trees for a in (t.tokens, t.parent, t.hidden, t.accepted)]
        return sum(a.nbytes for a in arrays)


class TraceAssembler:
    """Engine trace sink that emits one TracedSequence per finished request to `sink`.
    Several engines may share one (their emitter threads take turns); request ids must be
    unique among them."""

    def __init__(self, sink):
        self.sink = sink
        self._open: dict = {}
        self._lock = threading.Lock()

    def __call__(self, trace) -> None:
        with self._lock:
            self._take(trace)

    def _take(self, trace) -> None:
        if isinstance(trace, PrefillTrace):
            seq = {"domain": trace.domain, "tokens": list(trace.tokens) + [trace.first],
                   "aux": list(trace.aux), "hidden": list(trace.hidden), "trees": [],
                   "version": None}
            self._open[trace.request_id] = seq
            if trace.done:
                self._close(trace.request_id)
        elif isinstance(trace, VerifyTrace):
            for row in trace.rows():
                self._add(row)
        elif isinstance(trace, EndTrace) and trace.request_id in self._open:
            self._close(trace.request_id)  # ended early: what it committed is still data

    def _add(self, r: VerifyRecord) -> None:
        seq = self._open.get(r.request_id)
        if seq is None:  # its prefill trace was dropped: nothing to anchor to
            return
        root_pos = len(seq["aux"])
        path = r.path[: r.num_accepted + 1]
        accepted = np.zeros(len(r.tree_tokens), bool)
        accepted[path] = True
        seq["trees"].append(VerifiedTree(root_pos, r.tree_tokens, r.tree_parent, r.hidden,
                                         accepted))
        seq["aux"] += list(r.aux[path])
        seq["hidden"] += list(r.hidden[path])
        seq["tokens"] += [int(t) for t in r.committed]
        v = seq["version"]
        seq["version"] = r.draft_version if v is None else min(v, r.draft_version)
        if r.done:
            self._close(r.request_id)

    def _close(self, request_id) -> None:
        seq = self._open.pop(request_id)
        n = len(seq["aux"])
        if n < 2:
            return
        self.sink(TracedSequence(request_id, seq["domain"], seq["version"] or 0,
                           np.asarray(seq["tokens"][:n], np.int32), np.stack(seq["aux"]),
                           np.stack(seq["hidden"]), seq["trees"]))


@dataclasses.dataclass
class BufferStats:
    added: int = 0
    dropped_for_space: int = 0
    dropped_stale: int = 0
    bytes: int = 0


class TraceBuffer:
    """Bounded by `max_bytes`; `max_staleness` draft versions behind the newest are kept."""

    def __init__(self, max_bytes: int = 256 << 20, max_staleness: int | None = None, seed=0):
        self.max_bytes = max_bytes
        self.max_staleness = max_staleness
        self.stats = BufferStats()
        self._items: collections.deque[TracedSequence] = collections.deque()
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._listeners: list = []

    def listen(self, fn) -> None:
        """Calls `fn(seq)` for every sequence added (before any is dropped), starting with
        those the buffer holds now: for counts that must outlive the bounded buffer, such as
        the served-token frequencies. Each sequence reaches `fn` exactly once."""
        with self._lock:
            self._listeners.append(fn)
            for seq in self._items:
                fn(seq)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, seq: TracedSequence) -> None:
        size = seq.nbytes
        with self._lock:
            for fn in self._listeners:
                fn(seq)
            self.stats.added += 1
            if size > self.max_bytes:
                self.stats.dropped_for_space += 1
                return
            # Make room first, so that the byte count never exceeds the bound, even briefly.
            while self.stats.bytes + size > self.max_bytes:
                self.stats.bytes -= self._items.popleft().nbytes
                self.stats.dropped_for_space += 1
            self._items.append(seq)
            self.stats.bytes += size

    def drop_stale(self, current_version: int) -> None:
        if self.max_staleness is None:
            return
        with self._lock:
            keep = [s for s in self._items
                    if s.draft_version >= current_version - self.max_staleness]
            self.stats.dropped_stale += len(self._items) - len(keep)
            self.stats.bytes = sum(s.nbytes for s in keep)
            self._items = collections.deque(keep)

    def batch(self, batch_size: int, seq_len: int, trees: int, tree_size: int,
              recent: int = 0, held_out: bool = False,
              rng: np.random.Generator | None = None,
              sharding: jax.sharding.Sharding | None = None) -> LearnBatch:
        """B random sequences cut into windows (see `window`), placed by `sharding` (None: on
        the default device). With `recent` = n > 0 the newest n sequences are held out: a
        training batch (held_out=False) never draws them, a held-out batch (held_out=True)
        draws only them."""
        with self._lock:
            pool = list(self._items)
        pool = pool[len(pool) - recent:] if held_out else pool[:len(pool) - recent]
        if not pool:
            raise ValueError("the trace buffer has no sequences to draw from "
                             f"({len(self)} held, newest {recent} held out)")
        rng = self._rng if rng is None else rng  # another generator: training order unchanged
        picks = [pool[i] for i in rng.integers(len(pool), size=batch_size)]
        return collate([window(s, seq_len, trees, tree_size, rng) for s in picks], sharding)


def window(seq: TracedSequence, seq_len: int, trees: int, tree_size: int,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One learner example: a random window of `seq_len` positions of `seq` and up to `trees`
    of its trees whose roots fall inside it (those of `tree_size` nodes), zero-padded, masked.
    Pure numpy on the host; the same cut serves the live buffer and stored-trace replay."""
    a, h = seq.aux.shape[1:], seq.hidden.shape[1]
    out = {
        "tokens": np.zeros((seq_len,), np.int32),
        "aux": np.zeros((seq_len, *a), np.float32),
        "target_hidden": np.zeros((seq_len, h), np.float32),
        "length": np.zeros((), np.int32),
        "tree_tokens": np.zeros((trees, tree_size), np.int32),
        "tree_parent": np.full((trees, tree_size), -1, np.int32),
        "tree_hidden": np.zeros((trees, tree_size, h), np.float32),
        "tree_accepted": np.zeros((trees, tree_size), bool),
        "tree_root_pos": np.ones((trees,), np.int32),
        "tree_valid": np.zeros((trees,), bool),
    }
    n = len(seq.tokens)
    start = int(rng.integers(max(1, n - seq_len + 1)))
    end = min(n, start + seq_len)
    out["tokens"][: end - start] = seq.tokens[start:end]
    out["aux"][: end - start] = seq.aux[start:end]
    out["target_hidden"][: end - start] = seq.hidden[start:end]
    out["length"][...] = end - start
    # A tree needs its root's draft row (root_pos - 1) inside the window.
    inside = [t for t in seq.trees
              if start + 1 <= t.root_pos < end and len(t.tokens) == tree_size]
    for i, k in enumerate(rng.permutation(len(inside))[:trees]):
        t = inside[k]
        out["tree_tokens"][i] = t.tokens
        out["tree_parent"][i] = t.parent
        out["tree_hidden"][i] = t.hidden
        out["tree_accepted"][i] = t.accepted
        out["tree_root_pos"][i] = t.root_pos - start
        out["tree_valid"][i] = True
    return out


def collate_numpy(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack `window` examples along a new batch axis."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def collate(examples: list[dict[str, np.ndarray]],
            sharding: jax.sharding.Sharding | None = None) -> LearnBatch:
    """Stack `window` examples into one device batch, placed by `sharding` (None: on the
    default device)."""
    arrays = collate_numpy(examples)
    if sharding is None:
        return LearnBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
    return LearnBatch(**jax.device_put(arrays, sharding))

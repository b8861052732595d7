"""Traces in a store: finished sequences as tensorstore (zarr3) shards, for replay and for a
learner in another process or on another host.

A store is any kvstore (store/kvstore.py: a local path, file://, gs://, s3:// or memory://).
Its keys:

    shard-<time_ns>-<pid>-<tag>/   one shard of n sequences, each array a zarr3 array:
      tokens [T] int32, aux [T, A, H] f32, hidden [T, H] f32     sequences concatenated
      seq_offsets [n + 1] int64                                  where each sequence starts
      tree_seq [Nt] int32, tree_root_pos [Nt] int32                owner and anchor of each tree
      tree_tokens, tree_parent [Nt, N1] int32, tree_accepted [Nt, N1] bool,
      tree_hidden [Nt, N1, H] f32
    committed/shard-<...>.json     its meta (format, tree size, per sequence: request id,
                                   domain, version), written after every array: the commit

Readers list only `committed/`, so they never see half a shard: a writer killed mid-shard
leaves arrays no marker names, and a write that fails (a full disk) deletes what it wrote.
Listing one small key per shard also keeps a poll cheap on a bucket. The engine side is
`TraceStore` (a trace-assembler sink); readers are `TraceFollower` (tails the store into a
live `TraceBuffer`), `StoredTraces` (a random-access source) and `replay_dataset` (a grain
pipeline of learner batches over it).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path

import grain
import numpy as np
import tensorstore as ts

from aurora_jax.errors import ConfigError
from aurora_jax.learn.buffer import TracedSequence, VerifiedTree, collate_numpy, window
from aurora_jax.learn.losses import LearnBatch
from aurora_jax.store import kvstore
from aurora_jax.store.periodic import Periodic

log = logging.getLogger(__name__)

FORMAT = "aurora-jax-traces/1"
COMMITTED = "committed/"
_SHARD = re.compile(r"^shard-\d+-\d+-[0-9a-f]+$")
_SEQ_FIELDS = ("tokens", "aux", "hidden")
_TREE_FIELDS = ("tree_tokens", "tree_parent", "tree_accepted", "tree_hidden")

Store = kvstore.Location | ts.KvStore
"""A store's location, or the store opened (`kvstore.open_store`)."""


class TraceStoreError(Exception):
    """A shard that cannot be read as traces (names the shard and the reason)."""


def _write_arrays(store: ts.KvStore, arrays: dict[str, np.ndarray]) -> None:
    """Writes a shard's arrays (the seam tests and the soak use to make writes fail)."""
    kvstore.write_arrays(store, arrays)


def write_shard(root: Store, seqs: list[TracedSequence]) -> str:
    """Write `seqs` as one committed shard of the store at `root`; returns its name."""
    store = kvstore.open_store(root)
    tree_sizes = {len(t.tokens) for s in seqs for t in s.trees}
    if len(tree_sizes) > 1:
        raise ValueError(f"one shard holds one tree size, got {sorted(tree_sizes)}")
    n1 = tree_sizes.pop() if tree_sizes else 0
    h = seqs[0].hidden.shape[1]
    trees = [(i, t) for i, s in enumerate(seqs) for t in s.trees]
    arrays: dict[str, np.ndarray] = {
        "tokens": np.concatenate([s.tokens for s in seqs]).astype(np.int32),
        "aux": np.concatenate([s.aux for s in seqs]).astype(np.float32),
        "hidden": np.concatenate([s.hidden for s in seqs]).astype(np.float32),
        "seq_offsets": np.cumsum([0] + [len(s.tokens) for s in seqs]).astype(np.int64),
        "tree_seq": np.asarray([i for i, _ in trees], np.int32),
        "tree_root_pos": np.asarray([t.root_pos for _, t in trees], np.int32),
        "tree_tokens": np.asarray([t.tokens for _, t in trees], np.int32).reshape(-1, n1),
        "tree_parent": np.asarray([t.parent for _, t in trees], np.int32).reshape(-1, n1),
        "tree_accepted": np.asarray([t.accepted for _, t in trees], bool).reshape(-1, n1),
        "tree_hidden": np.asarray([t.hidden for _, t in trees], np.float32).reshape(-1, n1, h),
    }
    meta = {"format": FORMAT, "tree_size": n1, "hidden_size": h,
            "sequences": [{"request_id": _jsonable(s.request_id), "domain": s.domain,
                           "draft_version": s.draft_version} for s in seqs]}
    # Unique across writers: processes of one host differ in pid, hosts in the random tag.
    name = f"shard-{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        _write_arrays(store, {f"{name}/{key}": a for key, a in arrays.items()})
        kvstore.write_json(store, f"{COMMITTED}{name}.json", meta)  # the commit
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk leaves no half shard behind
            kvstore.delete_prefix(store, f"{name}/")
        raise
    return name


def _jsonable(x):
    return x if isinstance(x, (int, str, type(None))) else str(x)


def list_shards(root: Store) -> list[str]:
    """Names of the committed shards, oldest first (a shard whose marker is not written yet,
    or never will be because its writer died, is not listed)."""
    keys = kvstore.list_keys(kvstore.open_store(root), COMMITTED)
    names = (k.removesuffix(".json") for k in keys if k.endswith(".json"))
    return [n for n in names if _SHARD.match(n)]


def read_meta(root: Store, names: list[str]) -> list[dict]:
    """The metas of shards `names` (read concurrently); raises TraceStoreError naming the
    first unreadable one."""
    store = kvstore.open_store(root)
    try:
        metas = kvstore.read_json(store, [f"{COMMITTED}{n}.json" for n in names])
    except OSError as e:
        raise TraceStoreError(f"unreadable shard meta: {e}") from e
    for name, meta in zip(names, metas, strict=True):
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise TraceStoreError(f"{store.url}{name}: format {got!r}, expected {FORMAT!r}")
    return metas


def read_shard(root: Store, name: str) -> list[TracedSequence]:
    """All sequences of one shard; a damaged shard raises TraceStoreError naming it."""
    store = kvstore.open_store(root)
    (meta,) = read_meta(store, [name])
    keys = ("seq_offsets", "tree_seq", "tree_root_pos", *_SEQ_FIELDS, *_TREE_FIELDS)
    try:
        got = kvstore.read_arrays(store, [f"{name}/{k}" for k in keys])
    except OSError as e:  # damaged or missing arrays
        raise TraceStoreError(f"{store.url}{name}: {e}") from e
    a = {k: got[f"{name}/{k}"] for k in keys}
    off, rows = a["seq_offsets"], meta["sequences"]
    if len(off) != len(rows) + 1 or off[-1] != len(a["tokens"]):
        raise TraceStoreError(f"{store.url}{name}: sequence offsets do not match the data")
    trees: list[list[VerifiedTree]] = [[] for _ in rows]
    for r, i in enumerate(a["tree_seq"]):
        trees[i].append(VerifiedTree(int(a["tree_root_pos"][r]), a["tree_tokens"][r],
                             a["tree_parent"][r], a["tree_hidden"][r], a["tree_accepted"][r]))
    return [TracedSequence(m["request_id"], m["domain"], m["draft_version"],
                     a["tokens"][off[i]:off[i + 1]], a["aux"][off[i]:off[i + 1]],
                     a["hidden"][off[i]:off[i + 1]], trees[i])
            for i, m in enumerate(rows)]


class TraceStore:
    """Engine-side sink: `add(seq)` collects finished sequences and writes a shard every
    `sequences_per_shard` of them (on the caller's thread: the engine's trace thread, never
    the decode loop); `flush()` writes what is pending."""

    def __init__(self, root: kvstore.Location, sequences_per_shard: int = 16,
                 max_pending: int | None = None):
        self.location = os.fspath(root)
        """Where the shards go: a local path or a kvstore URL."""
        self.store = kvstore.open_store(root)
        self.sequences_per_shard = sequences_per_shard
        self.max_pending = max_pending or 4 * sequences_per_shard
        """Sequences held while writes fail (a full disk); the oldest beyond are dropped."""
        if self.max_pending < sequences_per_shard:
            raise ConfigError(f"a trace store holding at most {self.max_pending} sequences "
                              f"can never fill a shard of {sequences_per_shard}: give "
                              f"max_pending >= sequences_per_shard")
        self.shards_written = 0
        self.failed_writes = 0
        self.dropped = 0
        self.failing = False
        self._pending: list[TracedSequence] = []
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        """The store's directory, for a local store only (experiments/objectives.py renames it once
        its recording is complete); ValueError for any other kvstore."""
        d = kvstore.local_dir(self.location)
        if d is None:
            raise ValueError(f"{self.location} is not a local directory")
        return d

    def add(self, seq: TracedSequence) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:  # writes are failing: make room first,
                self._pending.pop(0)  # so that not even a write's attempt holds more
                self.dropped += 1
            self._pending.append(seq)
            if len(self._pending) >= self.sequences_per_shard:
                self._write()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._write()

    def _write(self) -> None:
        """Writes the pending sequences, one shard per tree size (engines of several
        speculation settings may share a store). A failed write (ENOSPC, say) keeps what it
        could not write, to retry with the next sequence: serving never waits for the disk,
        and `add` keeps memory bounded while it refuses (the newest `max_pending`)."""
        groups: dict[int, list[TracedSequence]] = {}
        for seq in self._pending:
            if seq.trees:
                groups.setdefault(len(seq.trees[0].tokens), []).append(seq)
        bare = [seq for seq in self._pending if not seq.trees]  # fit in any shard
        if bare:
            groups.setdefault(max(groups, default=0), []).extend(bare)
        written: list[TracedSequence] = []
        try:
            for group in groups.values():
                write_shard(self.store, group)
                written += group
                self.shards_written += 1
        except OSError as e:
            self.failed_writes += 1
            self._pending = [s for s in self._pending if not any(s is w for w in written)]
            if not self.failing:  # once per episode, not once per sequence
                log.warning("trace shards cannot be written (%s): holding the newest %d "
                            "sequences and dropping older ones until writes succeed", e,
                            self.max_pending)
            self.failing = True
            return
        if self.failing:
            log.warning("trace shards are written again (%d sequences dropped so far)",
                        self.dropped)
        self.failing = False
        self._pending = []


class TraceFollower:
    """Tails a store from another process: every `poll_s` seconds, each newly committed shard
    is read and its sequences handed to `sink` (say `TraceBuffer.add`). A damaged shard is
    logged, counted in `bad_shards` and skipped; it never stops the follower."""

    def __init__(self, root: kvstore.Location, sink, poll_s: float = 0.5):
        self.location, self.sink, self.poll_s = os.fspath(root), sink, poll_s
        self.store = kvstore.open_store(root)
        self.seen: set[str] = set()
        self.sequences = 0
        self.bad_shards = 0
        self.tree_size: int | None = None
        self._loop: Periodic | None = None

    def poll(self) -> int:
        """Read every shard not read before; returns the number of new sequences."""
        new = 0
        for name in list_shards(self.store):
            if name in self.seen:
                continue
            self.seen.add(name)
            try:
                seqs = read_shard(self.store, name)
            except TraceStoreError as e:
                self.bad_shards += 1
                log.warning("skipping trace shard: %s", e)
                continue
            sizes = [len(t.tokens) for s in seqs for t in s.trees]
            self.tree_size = max(sizes + [self.tree_size or 0]) or None  # the largest trees
            for s in seqs:
                self.sink(s)
            new += len(seqs)
        self.sequences += new
        return new

    def start(self) -> TraceFollower:
        self.poll()
        self._loop = Periodic(self.poll, self.poll_s, "aurora-trace-follower").start()
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()


class StoredTraces:
    """Random access over every sequence in a store's committed shards (a grain source).
    The shard list is fixed at construction; build a new one to see newer shards."""

    def __init__(self, root: kvstore.Location):
        self.store = kvstore.open_store(root)
        self.shards = list_shards(self.store)
        self.counts = [len(m["sequences"]) for m in read_meta(self.store, self.shards)]
        self._starts = np.cumsum([0] + self.counts).tolist()
        self._cache: tuple[int, list[TracedSequence]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> TracedSequence:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        with self._lock:  # one decoded shard cached: shuffled reads still hit it often
            if self._cache is None or self._cache[0] != k:
                self._cache = (k, read_shard(self.store, self.shards[k]))
            return self._cache[1][i - self._starts[k]]


def replay_dataset(root: kvstore.Location, batch_size: int, seq_len: int, trees: int,
                   tree_size: int, seed: int = 0) -> grain.IterDataset:
    """Endless learner batches over a store's sequences: shuffled per epoch, each sequence
    cut by the same `window` as the live buffer; deterministic for a seed, and its iterator
    state (`get_state`/`set_state`) resumes exactly."""
    source = StoredTraces(root)
    if len(source) == 0:
        raise ValueError(f"no committed trace shards under {root}")
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed)
          .repeat()
          .random_map(lambda s, rng: window(s, seq_len, trees, tree_size, rng), seed=seed)
          .batch(batch_size, drop_remainder=True, batch_fn=_to_batch))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def _to_batch(examples) -> LearnBatch:
    return LearnBatch(**collate_numpy(examples))  # type: ignore[arg-type]  # numpy leaves

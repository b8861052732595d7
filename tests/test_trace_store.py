"""Traces on disk: what the engine stores is what a reader in another process gets back, and
a replay dataset over the store cuts the same windows, deterministically and resumably."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from spec_models import random_pair, tiny_cfg

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.errors import ConfigError
from aurora_jax.learn.buffer import TraceAssembler
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.store.trace_store import (
    StoredTraces,
    TraceFollower,
    TraceStore,
    list_shards,
    replay_dataset,
)

SPEC = SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """11 requests served with a store (3 per shard: 4 shards, the last one by flush) and
    an in-memory list of the same sequences."""
    target, draft = random_pair(tiny_cfg(eos=()), seed=5)
    root = tmp_path_factory.mktemp("traces")
    store, kept = TraceStore(root, sequences_per_shard=3), []

    def both(seq):
        kept.append(seq)
        store.add(seq)

    engine = Engine(target, draft, SPEC, max_slots=4, max_len=48,
                    trace_sink=TraceAssembler(both))
    rs = np.random.RandomState(0)
    engine.run([Request(rs.randint(3, 40, size=rs.randint(4, 10)).tolist(), 16, id=f"r{i}",
                        domain="code" if i % 2 else "prose") for i in range(11)])
    engine.traces.flush()
    store.flush()
    return root, kept


def _same(a, b):
    assert (a.request_id, a.domain, a.draft_version) == (b.request_id, b.domain, b.draft_version)
    for f in ("tokens", "aux", "hidden"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert len(a.trees) == len(b.trees) > 0
    for ta, tb in zip(a.trees, b.trees, strict=True):
        assert ta.root_pos == tb.root_pos
        for f in ("tokens", "parent", "hidden", "accepted"):
            np.testing.assert_array_equal(getattr(ta, f), getattr(tb, f))


def test_a_follower_reads_back_exactly_what_the_engine_stored(served, tmp_path, caplog):
    root, kept = served
    assert len(list_shards(root)) == 4
    # A shard whose writer died mid-write (its arrays written, its commit marker not) is
    # never listed; a damaged shard is skipped, counted and logged, and reading goes on.
    work = tmp_path / "store"
    shutil.copytree(root, work)
    shards = list_shards(work)
    shutil.copytree(work / shards[0], work / "shard-00000000000000000001-1-00000000")
    damaged = shards[1]
    (work / damaged / "tree_hidden" / "zarr.json").write_text("{not json")
    got = []
    follower = TraceFollower(work, got.append)
    with caplog.at_level(logging.WARNING):
        assert follower.poll() == 11 - 3
    assert follower.bad_shards == 1 and damaged in caplog.text
    assert follower.tree_size == SPEC.nodes + 1
    expect = kept[:3] + kept[6:]  # shards hold sequences in arrival order, 3 each
    assert len(got) == len(expect)
    for a, b in zip(got, expect, strict=True):
        _same(a, b)
    assert follower.poll() == 0  # nothing new


def test_stored_traces_index_every_sequence(served):
    root, kept = served
    source = StoredTraces(root)
    assert len(source) == 11
    for i in (0, 5, 10, 3, 7):
        _same(source[i], kept[i])


def test_replay_batches_are_windows_of_stored_sequences_and_resume_exactly(served):
    root, kept = served
    args = dict(batch_size=4, seq_len=12, trees=3, tree_size=SPEC.nodes + 1, seed=7)
    it = iter(replay_dataset(root, **args))
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    fourth = next(it)
    # Same seed, same batches; a restored iterator continues where the state was taken.
    again = iter(replay_dataset(root, **args))
    for b in batches:
        np.testing.assert_array_equal(next(again).tokens, b.tokens)
    resumed = iter(replay_dataset(root, **args))
    resumed.set_state(state)
    nxt = next(resumed)
    for f in ("tokens", "aux", "tree_tokens", "tree_root_pos", "tree_valid"):
        np.testing.assert_array_equal(getattr(nxt, f), getattr(fourth, f))
    # Every row is a contiguous window of one stored sequence, with its features, and every
    # valid tree is one of that sequence's trees re-anchored to the window.
    trees_seen = 0
    for b in batches + [fourth]:
        for r in range(4):
            n = int(b.length[r])
            assert 1 <= n <= 12
            src = [(s, st) for s in kept for st in range(len(s.tokens) - n + 1)
                   if np.array_equal(s.tokens[st:st + n], b.tokens[r, :n])
                   and np.array_equal(s.aux[st:st + n], b.aux[r, :n])]
            assert src, "a replayed window matches no stored sequence"
            s, st = src[0]
            np.testing.assert_array_equal(b.target_hidden[r, :n], s.hidden[st:st + n])
            for t in range(3):
                if not b.tree_valid[r, t]:
                    continue
                trees_seen += 1
                pos = int(b.tree_root_pos[r, t]) + st
                match = [tr for tr in s.trees if tr.root_pos == pos
                         and np.array_equal(tr.tokens, b.tree_tokens[r, t])
                         and np.array_equal(tr.accepted, b.tree_accepted[r, t])]
                assert match
    assert trees_seen > 0


def test_a_full_disk_costs_traces_not_memory_nor_half_shards(served, tmp_path, monkeypatch):
    """While shard writes fail (ENOSPC), the store holds at most `max_pending` sequences,
    even during a write's attempt, counts what it drops, leaves no key behind, and writes
    again once the disk does; a follower reads only whole shards throughout. A bound below
    one shard is refused."""
    import dataclasses
    import errno

    from aurora_jax.store import kvstore, trace_store

    _, kept = served
    with pytest.raises(ConfigError, match="max_pending >= sequences_per_shard"):
        TraceStore(tmp_path, sequences_per_shard=4, max_pending=3)
    store = TraceStore(tmp_path, sequences_per_shard=2, max_pending=3)
    real = trace_store._write_arrays
    full = {"on": True}

    held = []  # sequences the store holds while it tries to write

    def write_arrays(kv, arrays):
        held.append(len(store._pending))
        if full["on"]:  # fails midway: some arrays already on disk
            real(kv, {k: a for k, a in arrays.items() if a.ndim == 1})
            raise OSError(errno.ENOSPC, "No space left on device")
        real(kv, arrays)

    monkeypatch.setattr(trace_store, "_write_arrays", write_arrays)
    for seq in kept[:8]:
        store.add(seq)
        assert len(store._pending) <= 3
    assert max(held) == 3, held  # not even while a write is tried (the soak samples then)
    assert store.failing and store.shards_written == 0 and store.dropped == 5
    assert kvstore.list_keys(store.store) == []  # not one array of a half shard
    full["on"] = False
    store.add(kept[8])
    assert not store.failing and store._pending == [] and store.shards_written == 1
    assert store.dropped == 6  # the newest took the oldest's place before the write
    got = []
    TraceFollower(tmp_path, got.append).poll()
    assert [s.request_id for s in got] == [s.request_id for s in kept[6:9]]
    # Sequences of different tree sizes (engines of several settings share a store) go to
    # shards of their own instead of failing the write.
    small = dataclasses.replace(kept[9], request_id="small", trees=[
        dataclasses.replace(t, tokens=t.tokens[:1], parent=t.parent[:1], hidden=t.hidden[:1],
                            accepted=t.accepted[:1]) for t in kept[9].trees])
    store.add(kept[10])
    store.add(small)
    assert store.shards_written == 3 and store._pending == []
    follower = TraceFollower(tmp_path, got.append)
    got.clear()
    follower.poll()
    assert {s.request_id for s in got} == \
        {s.request_id for s in kept[6:9] + kept[10:11]} | {"small"}
    assert follower.tree_size == len(kept[10].trees[0].tokens)

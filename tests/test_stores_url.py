"""Stores anywhere: traces and drafts behind any tensorstore kvstore URL, so a learner on
another host needs no shared filesystem. What a writer writes through a URL a reader reads
back identically; a half-written shard or version is invisible to readers; a draft published
through memory:// swaps into an engine losslessly, and a learner trains and publishes through
a memory:// workdir; a plain path is its file:// URL; a typo'd scheme is refused by name.
memory:// lives in one process, so each test has its writer and its reader in this one."""

from __future__ import annotations

import errno
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import random_pair, swap_state, tiny_cfg

from aurora_jax.engine.engine import Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.errors import ConfigError
from aurora_jax.learn.buffer import TracedSequence, VerifiedTree
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.online import OnlineConfig
from aurora_jax.learn.remote import run_learner
from aurora_jax.serve.config import ServeLearner
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.stack import shared_engine
from aurora_jax.store import kvstore, trace_store
from aurora_jax.store.draft_store import (
    DraftPublisher,
    DraftWatcher,
    list_versions,
    restore_draft,
)
from aurora_jax.store.trace_store import StoredTraces, TraceFollower, TraceStore, list_shards
from aurora_jax.store.workdir import workdir_paths

SPEC = SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=5)
_fresh = itertools.count()


@pytest.fixture(params=["file", "memory"])
def location(request, tmp_path) -> str:
    """A store URL of each kind, new for each test (memory:// keys outlive a test)."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return f"memory://test-{next(_fresh)}/store"


def _sequences(n: int, seed: int, n1: int = 4, h: int = 8) -> list[TracedSequence]:
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        t = rs.randint(3, 12)
        trees = [VerifiedTree(int(rs.randint(t)), rs.randint(0, 40, n1).astype(np.int32),
                              rs.randint(-1, n1, n1).astype(np.int32),
                              rs.randn(n1, h).astype(np.float32), rs.rand(n1) < 0.5)
                 for _ in range(rs.randint(1, 4))]
        out.append(TracedSequence(f"r{seed}-{i}", ("code", None)[i % 2], i % 3,
                                  rs.randint(0, 40, t).astype(np.int32),
                                  rs.randn(t, 3, h).astype(np.float32),
                                  rs.randn(t, h).astype(np.float32), trees))
    return out


def _same(a: TracedSequence, b: TracedSequence) -> None:
    assert (a.request_id, a.domain, a.draft_version) == (b.request_id, b.domain, b.draft_version)
    for f in ("tokens", "aux", "hidden"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert len(a.trees) == len(b.trees) > 0
    for ta, tb in zip(a.trees, b.trees, strict=True):
        assert ta.root_pos == tb.root_pos
        for f in ("tokens", "parent", "hidden", "accepted"):
            np.testing.assert_array_equal(getattr(ta, f), getattr(tb, f))


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_traces_written_through_a_url_read_back_identically(location):
    seqs = _sequences(7, seed=0)
    store = TraceStore(location, sequences_per_shard=3)
    for s in seqs:
        store.add(s)
    store.flush()
    assert store.shards_written == 3 and len(list_shards(location)) == 3
    got: list[TracedSequence] = []
    follower = TraceFollower(location, got.append)
    assert follower.poll() == 7 and follower.poll() == 0
    for a, b in zip(got, seqs, strict=True):
        _same(a, b)
    source = StoredTraces(location)
    assert len(source) == 7
    for i in (6, 0, 3):
        _same(source[i], seqs[i])


def test_a_half_written_shard_is_invisible_and_a_failed_one_leaves_nothing(location,
                                                                          monkeypatch):
    seqs = _sequences(6, seed=1)
    store = TraceStore(location, sequences_per_shard=2)
    for s in seqs[:2]:
        store.add(s)
    # A writer killed after its arrays and before its commit marker: arrays, no marker.
    kvstore.write_arrays(store.store, {"shard-00000000000000000001-1-00000000/tokens":
                                       np.arange(5, dtype=np.int32)})
    got: list[TracedSequence] = []
    follower = TraceFollower(location, got.append)
    assert follower.poll() == 2 and len(StoredTraces(location)) == 2
    before = kvstore.list_keys(store.store)
    # A write that fails midway (a full disk) deletes what it wrote before the failure.
    real = trace_store._write_arrays

    def half_then_full(kv, arrays):
        real(kv, dict(list(arrays.items())[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trace_store, "_write_arrays", half_then_full)
    for s in seqs[2:4]:
        store.add(s)
    assert store.failing and kvstore.list_keys(store.store) == before
    assert follower.poll() == 0
    monkeypatch.setattr(trace_store, "_write_arrays", real)
    for s in seqs[4:]:
        store.add(s)
    store.flush()
    assert not store.failing and follower.poll() == 4  # the two held, then the two new
    for a, b in zip(got, seqs, strict=True):
        _same(a, b)


def test_a_plain_path_is_its_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seqs = _sequences(3, seed=2)
    store = TraceStore("work/traces", sequences_per_shard=3)
    for s in seqs:
        store.add(s)
    assert store.root == tmp_path / "work" / "traces"
    got: list[TracedSequence] = []
    TraceFollower(f"file://{tmp_path}/work/traces", got.append).poll()
    for a, b in zip(got, seqs, strict=True):
        _same(a, b)
    assert workdir_paths("work") == ("work/traces", "work/drafts")
    assert workdir_paths("gs://bucket/work/") == ("gs://bucket/work/traces",
                                                  "gs://bucket/work/drafts")
    _, draft = random_pair(tiny_cfg(eos=()), seed=3)
    pub = DraftPublisher("work/drafts", draft.state)
    good = swap_state(draft, seed=1)
    assert pub.publish(good) == 1
    assert list_versions(f"file://{tmp_path}/work/drafts/") == [1]
    assert _equal(restore_draft(f"file://{tmp_path}/work/drafts", 1, draft.state)[0], good)


@pytest.mark.parametrize("bad", ["gcs://bucket/work", "gs:/bucket/work", "S3://bucket/work",
                                 "file:/tmp/work", "file://relative/work"])
def test_a_typo_in_the_scheme_is_refused_naming_the_url(bad):
    for make in (lambda: TraceStore(bad), lambda: DraftPublisher(bad, None),
                 lambda: workdir_paths(bad)):
        with pytest.raises(ConfigError) as e:
            make()
        assert repr(bad) in str(e.value)
    with pytest.raises(ConfigError, match="learner.workdir") as e:
        ServeLearner(mode="workdir", workdir=bad)
    if "://" not in bad or bad.split("://")[0] not in kvstore.SCHEMES:
        assert "gs://" in str(e.value) and "memory://" in str(e.value)


@pytest.mark.parametrize("url, driver", [("gs://bucket/x", "gcs"), ("s3://bucket/x", "s3")])
def test_a_bucket_url_names_its_driver_bucket_and_path(url, driver):
    """Offline (nothing is opened): the tensorstore spec a store opens for a bucket URL has
    the cloud driver, the bucket, and the path as a prefix of keys; so do the traces and
    drafts of a workdir there."""
    assert kvstore.spec(url) == {"driver": driver, "bucket": "bucket", "path": "x/"}
    assert kvstore.spec(url + "/") == kvstore.spec(url)
    traces, drafts = workdir_paths(url)
    assert kvstore.spec(traces) == {"driver": driver, "bucket": "bucket", "path": "x/traces/"}
    assert kvstore.spec(drafts) == {"driver": driver, "bucket": "bucket", "path": "x/drafts/"}


def test_a_server_refuses_a_workdir_no_learner_process_can_reach():
    with pytest.raises(ConfigError, match="memory://x/work"):
        ServeLearner(mode="workdir", workdir="memory://x/work")
    assert ServeLearner(mode="workdir", workdir="gs://bucket/work").workdir == \
        "gs://bucket/work"


def test_drafts_and_training_state_published_through_a_url_restore_identically(location):
    target, draft = random_pair(tiny_cfg(eos=()), seed=4)
    learner = Learner(draft, target)
    rs = np.random.RandomState(0)
    trained = jax.tree.map(  # nonzero moments and a step, so that equality means something
        lambda x: x + (jnp.asarray(rs.randn(*x.shape), x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else 3), learner.state)
    pub = DraftPublisher(location, draft.state)
    good = swap_state(draft, seed=1)
    assert pub.publish(good, meta={"learner_step": 3}, learner=trained) == 1
    again = DraftPublisher(location, draft.state)  # as a restarted learner would
    version, state = again.resume()
    assert version == 1 and _equal(state, good)
    for x, like in zip(jax.tree.leaves(state), jax.tree.leaves(draft.state), strict=True):
        assert x.sharding == like.sharding
    assert restore_draft(location, 1, draft.state)[1]["learner_step"] == 3
    kept = again.restore_learner(1, learner.state)
    assert _equal(kept, trained) and int(kept.step) == int(trained.step)
    assert jax.tree.structure(kept) == jax.tree.structure(trained)


def test_a_half_written_version_is_invisible_and_old_ones_are_pruned(location, monkeypatch):
    _, draft = random_pair(tiny_cfg(eos=()), seed=5)
    pub = DraftPublisher(location, draft.state, max_to_keep=2)
    first = swap_state(draft, seed=1)
    pub.publish(first)

    def killed(*args, **kwargs):  # the learner dies before its manifest is written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(kvstore, "write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            pub.publish(swap_state(draft, seed=2))
    assert any(k.startswith("v2/") for k in kvstore.list_keys(pub.store))  # its arrays
    assert list_versions(location) == [1]
    restarted = DraftPublisher(location, draft.state, max_to_keep=2)
    assert restarted.version == 1 and restarted.resume()[0] == 1
    states = {v: swap_state(draft, seed=10 + v) for v in (2, 3, 4)}
    for v, s in states.items():
        assert restarted.publish(s) == v
    assert list_versions(location) == [3, 4]
    assert {k.split("/")[0] for k in kvstore.list_keys(pub.store)} == {"v3", "v4"}
    for v in (3, 4):
        assert _equal(restore_draft(location, v, draft.state)[0], states[v])


def test_an_engine_and_a_learner_share_nothing_but_a_memory_workdir():
    """The engine writes traces to a memory:// workdir and swaps in what is published there;
    a learner over the same URL trains on those traces and publishes; every request is
    served with the target's own output, before and after the swap."""
    target, draft = random_pair(tiny_cfg(eos=()), seed=6)
    work = f"memory://test-{next(_fresh)}/work"
    engine, store, watcher = shared_engine(target, draft, SPEC, work, poll_s=3600,
                                           sequences_per_shard=2, max_slots=4, max_len=48)
    gen = TargetGenerator(target, eos_ids=())
    rs = np.random.RandomState(0)
    prompts = [rs.randint(3, 40, size=rs.randint(4, 10)).tolist() for _ in range(4)]
    want = [c.token_ids for c in gen.generate(prompts, 16).completions]
    try:
        # A draft published by hand through the URL swaps in losslessly.
        traces, drafts = workdir_paths(work)
        good = swap_state(draft, seed=1)
        assert DraftPublisher(drafts, draft.state).publish(good) == 1
        assert watcher.poll() == 1 and _equal(engine.draft_state, good)
        run = engine.run([Request(p, 16) for p in prompts])
        assert [r.token_ids for r in run.results] == want
        assert {v for r in run.results for v in r.draft_versions} == {1}
        assert engine.traces is not None
        engine.traces.flush()
        store.flush()
        # The learner: traces and the tree size from the workdir, drafts back into it.
        cfg = OnlineConfig(batch_size=2, seq_len=16, trees_per_seq=2, min_sequences=2,
                           every_steps=2, max_steps=2)
        limit_s = 600  # generous: the learner compiles its step on a loaded 2-core machine
        deadline = time.monotonic() + limit_s
        online = run_learner(target, draft, work, cfg, poll_s=0.05,
                             should_stop=lambda: time.monotonic() > deadline)
        assert online.error is None and online.steps == 2 and online.published >= 1, \
            (f"in {limit_s} s the learner ran {online.steps} of 2 steps and published "
             f"{online.published} drafts (its error: {online.error!r})")
        newest = list_versions(drafts)[-1]
        assert newest == 2 and watcher.poll() == 2
        run = engine.run([Request(p, 16) for p in prompts])
        assert [r.token_ids for r in run.results] == want
        assert {v for r in run.results for v in r.draft_versions} == {2}
    finally:
        watcher.stop()
    engine.traces.flush()
    store.flush()
    got: list[TracedSequence] = []
    TraceFollower(traces, got.append).poll()
    assert sorted(s.draft_version for s in got) == [1] * 4 + [2] * 4


def test_a_rejection_note_written_through_a_url_reaches_the_learner(location):
    _, draft = random_pair(tiny_cfg(eos=()), seed=7)
    pub = DraftPublisher(location, draft.state)
    good, bad = swap_state(draft, seed=1), swap_state(draft, seed=2)
    pub.publish(good)
    pub.publish(bad)

    class Channel:  # the part of a draft channel a watcher's refusal touches
        version = 1

    DraftWatcher(Channel(), location).refuse(2, "acceptance collapsed")
    (version, state), = pub.take_rejections()
    assert version == 2 and _equal(state, good)
    assert DraftPublisher(location, draft.state).resume()[0] == 1


def test_the_learners_ctrl_c_line_names_a_url_workdir_as_given():
    """An interrupted `learn --workdir gs://...` says where its traces and drafts are in the
    URL's own form (a path join would fold the scheme's // into /)."""
    from types import SimpleNamespace

    from aurora_jax.learn_job import published as _published

    online = SimpleNamespace(publisher=SimpleNamespace(version=0), published=0)
    assert _published(online, "gs://bucket/work").endswith("stay in gs://bucket/work/traces")
    online.publisher.version, online.published = 3, 2
    assert "kept the drafts in gs://bucket/work/drafts (newest version 3, 2 published" in \
        _published(online, "gs://bucket/work")

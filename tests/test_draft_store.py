"""Drafts across processes: the engine takes each good published version, refuses damaged,
partial, non-finite and misfit ones with a logged reason while its serving draft stays, and
keeps serving losslessly when the learner process is killed mid-run."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import child_env
from spec_models import random_pair, swap_state, tiny_cfg

from aurora_jax.engine.channel import DraftChannel
from aurora_jax.engine.engine import Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.errors import DraftRefused
from aurora_jax.models.eagle3 import DraftConfig, init_draft
from aurora_jax.models.eagle3_io import load_draft, save_draft
from aurora_jax.models.hf_io import load_target, save_target
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.stack import shared_engine
from aurora_jax.store.draft_store import DraftPublisher, DraftWatcher, list_versions
from aurora_jax.testing.soak import damage_version

SPEC = SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=5)


def _prompts(n, seed):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 40, size=rs.randint(4, 10)).tolist() for _ in range(n)]


def nnx_params(state):
    """The trainable part of a draft state (what a LearnerState's params hold)."""
    from flax import nnx

    return state.filter(nnx.Param)


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(target, draft, engine): one engine over a random pair, writing its traces to a
    workdir, that the watcher tests share (built and compiled once); take it through
    `served`. Each test watches a drafts directory of its own with a watcher of its own."""
    target, draft = random_pair(tiny_cfg(eos=()), seed=3)
    engine, store, watcher = shared_engine(target, draft, SPEC, tmp_path_factory.mktemp("work"),
                                           poll_s=3600, max_slots=2, max_len=32)
    yield target, draft, engine
    watcher.stop()


@pytest.fixture
def served(shared):
    """The shared engine as a test expects a new one: serving the pair's own draft as
    version 0, whatever the last test swapped in (a swap recompiles nothing)."""
    target, draft, engine = shared
    engine.set_draft(draft.state, version=0)
    return shared


def test_watcher_swaps_good_versions_and_refuses_bad_ones(served, tmp_path, caplog,
                                                           monkeypatch):
    target, draft, engine = served
    drafts = tmp_path / "drafts"
    watcher = DraftWatcher(DraftChannel(engine), drafts, poll_s=3600)
    pub = DraftPublisher(drafts, draft.state)
    good = swap_state(draft, seed=1)
    assert pub.publish(good) == 1
    assert watcher.poll() == 1 and engine.draft_version == 1
    assert _equal(engine.draft_state, good)

    caplog.set_level(logging.WARNING)
    nan = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.dtype == jnp.float32 else x,
                       swap_state(draft, seed=3))
    with pytest.raises(DraftRefused, match="non-finite"):  # this publisher checks first
        pub.publish(nan)
    # The bad versions below come from a learner that does not check (or a disk that
    # damaged them): the watcher must refuse them on its own.
    monkeypatch.setattr("aurora_jax.store.draft_store.draft_problem", lambda *a: None)
    # 2: damaged array files (as if the disk or a copy went wrong after the commit).
    pub.publish(swap_state(draft, seed=2))
    damage_version(drafts, 2)
    # 3: a NaN in one matrix (a diverged learner).
    pub.publish(nan)
    # 4: a draft for another vocabulary (a misconfigured learner).
    other = init_draft(DraftConfig.for_target(target.cfg, draft_vocab_size=20), seed=4)
    pub.publish(other.state)
    # A partial save (its writer was killed before the manifest) is not a version at all.
    shutil.copytree(drafts / "v4", drafts / "v5")
    (drafts / "v5" / "manifest.json").unlink()
    assert list_versions(drafts) == [2, 3, 4]  # the publisher keeps the newest 3

    assert watcher.poll() is None
    assert engine.draft_version == 1 and _equal(engine.draft_state, good)
    assert sorted(watcher.refused) == [2, 3, 4]
    assert "non-finite" in watcher.refused[3]
    assert "shape" in watcher.refused[4]
    for v in (2, 3, 4):
        assert f"refusing draft version {v}" in caplog.text
    caplog.clear()
    assert watcher.poll() is None and "refusing" not in caplog.text  # refused once, not retried

    newest = swap_state(draft, seed=6)
    assert pub.publish(newest) == 5  # over what the partial save left of 5
    assert watcher.poll() == 5 and _equal(engine.draft_state, newest)
    prompts = _prompts(3, seed=0)
    run = engine.run([Request(p, 12) for p in prompts])
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 12)
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref.completions]
    assert {v for r in run.results for v in r.draft_versions} == {5}
    # A learner restarted on this directory resumes from the newest good version.
    assert DraftPublisher(drafts, draft.state).resume()[0] == 5


def test_learner_process_killed_mid_run_leaves_the_engine_serving(tmp_path):
    """A real `aurora-jax learn` process trains on the traces this engine writes and publishes
    drafts that the engine swaps in; killed with SIGKILL, it leaves the engine serving its
    newest committed draft, every request completing with the target's own output. Where
    the kill lands (a step, a save) is left to chance on purpose: the assertions hold
    wherever it lands, so no timing margin is involved; the waits have generous limits."""
    target0, draft0 = random_pair(tiny_cfg(eos=()), seed=8)
    save_target(tmp_path / "target", target0.cfg, target0.state)
    save_draft(tmp_path / "draft", draft0)
    target = load_target(tmp_path / "target")
    draft = load_draft(tmp_path / "draft", target=target.cfg)
    work = tmp_path / "work"
    log_path = tmp_path / "learner.log"
    env = child_env()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aurora_jax.cli", "learn", "--workdir", str(work),
             f"target={tmp_path / 'target'}", f"draft={tmp_path / 'draft'}",
             "online.every_steps=3", "online.batch_size=4", "online.seq_len=32",
             "loss.ttt_steps=2"], stdout=log, stderr=subprocess.STDOUT, env=env)
    engine, store, watcher = shared_engine(target, draft, SPEC, work, poll_s=0.2,
                                           sequences_per_shard=2, max_slots=4, max_len=48)
    gen = TargetGenerator(target, eos_ids=())
    try:
        # Generous: the learner process imports jax, compiles its step and waits for traces,
        # all while this process serves on the same cores.
        limit_s = 600
        deadline = time.monotonic() + limit_s
        seed = 0
        while watcher.swaps < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.returncode is not None
                       else f"still running after {limit_s} s")
                pytest.fail(f"the engine swapped in {watcher.swaps} of 2 learner drafts; the "
                            f"learner {why}; its log:\n" + log_path.read_text()[-3000:])
            seed += 1
            prompts = _prompts(4, seed)
            run = engine.run([Request(p, 16) for p in prompts])
            assert [r.token_ids for r in run.results] == \
                [c.token_ids for c in gen.generate(prompts, 16).completions]
            engine.traces.flush()
            store.flush()
        proc.send_signal(signal.SIGKILL)  # mid-run: it is training, maybe saving
        proc.wait()
        watcher.stop()  # no poll of its own in flight: the one below sees every version
        watcher.poll()
        newest = list_versions(work / "drafts")[-1]
        assert engine.draft_version == newest >= 2 and not watcher.refused
        prompts = _prompts(6, seed=99)
        run = engine.run([Request(p, 16) for p in prompts])
        assert [r.token_ids for r in run.results] == \
            [c.token_ids for c in gen.generate(prompts, 16).completions]
        assert {v for r in run.results for v in r.draft_versions} == {newest}
    finally:
        watcher.stop()
        if proc.poll() is None:
            proc.kill()
    # A learner started again on the workdir resumes from the newest version it published,
    # with the training state it published with it: step, weights and optimizer moments.
    from aurora_jax.learn.learner import Learner
    from aurora_jax.store.draft_store import restore_draft

    again = DraftPublisher(work / "drafts", draft.state)
    version, state = again.resume()
    assert version == newest
    fresh = Learner(dataclasses.replace(draft, state=state), target)
    kept = again.restore_learner(version, fresh.state)
    meta = restore_draft(work / "drafts", version, state)[1]
    assert int(kept.step) == meta["learner_step"] > 0
    moments = [x for x in jax.tree.leaves(kept.opt_state) if x.ndim > 0]
    assert moments and any(float(jnp.abs(m).max()) > 0 for m in moments)
    params = nnx_params(state)
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert Path(work / "traces").is_dir() and store.shards_written >= 2


def test_a_staging_watcher_reads_and_checks_but_leaves_the_swap_to_the_loop(served, tmp_path,
                                                                            monkeypatch):
    """In a multi-process server the watcher only stages (serve/lockstep.py): a good version
    is read to host memory and held once; the engine keeps serving its draft until the loop
    places and swaps it; a damaged version is refused as in the swapping watcher."""
    from aurora_jax.models.sharding import place_like

    _, draft, engine = served
    watcher = DraftWatcher(DraftChannel(engine), tmp_path / "drafts", poll_s=3600, stage=True)
    pub = DraftPublisher(tmp_path / "drafts", draft.state)
    good = swap_state(draft, seed=1)
    assert pub.publish(good) == 1
    assert watcher.poll() == 1 and engine.draft_version == 0  # staged, not swapped
    assert watcher.poll() is None  # held once
    version, host = watcher.take_staged()
    assert version == 1 and watcher.take_staged() is None
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    placed = place_like(host, engine.draft_state)
    assert _equal(placed, good)
    assert [x.sharding for x in jax.tree.leaves(placed)] == \
        [x.sharding for x in jax.tree.leaves(engine.draft_state)]
    engine.set_draft(placed, version=1)
    watcher.swapped(1, host)

    nan = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.dtype == jnp.float32 else x,
                       swap_state(draft, seed=3))
    monkeypatch.setattr("aurora_jax.store.draft_store.draft_problem", lambda *a: None)
    pub.publish(nan)  # a learner that does not check: the watcher must
    assert watcher.poll() is None and watcher.take_staged() is None
    assert "non-finite" in watcher.refused[2]
    assert engine.draft_version == 1 and watcher.swaps == 1

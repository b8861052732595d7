"""Hot swaps that must not stand: the acceptance-collapse guard (engine/guard.py) rolls back
a draft that is valid in shape and wrong in content, and publications that would serve a
zeroed, stale or non-finite draft, or that silently do not take, are refused or raised."""

from __future__ import annotations

import queue
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import copycat_pair, swap_state, tiny_cfg

from aurora_jax.engine.batcher import Request
from aurora_jax.engine.channel import DraftChannel
from aurora_jax.engine.engine import Engine
from aurora_jax.engine.guard import CollapseGuard, GuardConfig
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.errors import DraftRefused, SwapError
from aurora_jax.models.eagle3 import draft_problem
from aurora_jax.serve.loop import ServingLoop, Ticket
from aurora_jax.serve.metrics import ServerMetrics
from aurora_jax.serve.text import TextStream
from aurora_jax.speculative.config import SpecConfig


def _counts(**by_mode):
    """Fake batchers: mode -> {version: (rows, accepted)}."""
    return {m: types.SimpleNamespace(by_version={v: list(c) for v, c in d.items()})
            for m, d in by_mode.items()}


def test_the_guard_rolls_back_a_collapse_and_trusts_what_holds():
    cfg = GuardConfig(min_rows=10)
    g = CollapseGuard(cfg, ("s0", 0))
    g.swapped(("s1", 1))
    # Not enough rows of version 1 yet: no verdict.
    assert g.check(_counts(spec={0: (20, 34), 1: (9, 0)})) is None and g.probation
    # 2.70 -> 1.00 on 10 rows: rolled back to version 0's state.
    r = g.check(_counts(spec={0: (20, 34), 1: (10, 0)}))
    assert (r.bad_version, r.version, r.state) == (1, 0, "s0") and "collapsed" in r.reason
    assert g.rolled_back.keys() == {1} and g.probation is None
    g.swapped(("s0", 0))  # the rollback taking effect is no new version
    assert g.probation is None
    # A small drop is noise: 2.70 -> 2.50 stands, and version 2 becomes the trusted one.
    g.swapped(("s2", 2))
    assert g.check(_counts(spec={0: (20, 34), 2: (10, 15)})) is None
    assert g.trusted == ("s2", 2) and g.judged[2] == "trusted"
    # Day-0 acceptance: 1.05 -> 1.00 is under min_drop, not a collapse.
    g = CollapseGuard(cfg, ("s0", 0))
    g.swapped(("s1", 1))
    assert g.check(_counts(spec={0: (100, 5), 1: (100, 0)})) is None and g.trusted[1] == 1
    # 1.30 -> 1.10 is a drop of 0.2: under min_drop. 3.0 -> 2.0 is a half of the gain: one.
    g = CollapseGuard(cfg, ("s0", 0))
    g.swapped(("s1", 1))
    assert g.check(_counts(spec={0: (10, 3), 1: (10, 1)})) is None
    g.swapped(("s2", 2))
    assert g.check(_counts(spec={1: (10, 20), 2: (10, 10)})).bad_version == 2


def test_the_guard_compares_within_one_setting_and_waits_for_a_baseline():
    g = CollapseGuard(GuardConfig(min_rows=10), ("s0", 0))
    g.swapped(("s1", 1))
    g.swapped(("s2", 2))  # version 1 never judged: version 2 is compared with version 0
    # The tree accepted more than the chain ever does; compared per setting, no collapse.
    r = g.check(_counts(tree={0: (10, 30), 2: (10, 28)}, chain={0: (10, 10), 2: (10, 9)}))
    assert r is None and g.trusted[1] == 2
    # No baseline for the trusted version anywhere: trusted once measured.
    g = CollapseGuard(GuardConfig(min_rows=10), ("s0", 0))
    g.swapped(("s1", 1))
    assert g.check(_counts(spec={0: (3, 9), 1: (10, 0)})) is None and g.trusted[1] == 1
    # Disabled: nothing is ever on probation.
    g = CollapseGuard(GuardConfig(enabled=False, min_rows=10), ("s0", 0))
    g.swapped(("s1", 1))
    assert g.check(_counts(spec={0: (10, 30), 1: (10, 0)})) is None and g.probation is None


@pytest.fixture(scope="module")
def copycat():
    return copycat_pair(tiny_cfg())


@pytest.fixture(scope="module")
def copycat_engine(copycat) -> Engine:
    """The one engine over the copycat pair that this module's tests share (built and
    compiled once); take it through `engine`."""
    target, draft, _ = copycat
    return Engine(target, draft, SpecConfig(mode="chain", depth=3), max_slots=2, max_len=96)


@pytest.fixture
def engine(copycat, copycat_engine) -> Engine:
    """The shared copycat engine as a test expects a new one: serving the copycat draft
    itself (the very state object) as version 0, whatever the last test swapped in. A swap
    takes params as arguments, so handing the engine on recompiles nothing."""
    copycat_engine.set_draft(copycat[1].state, version=0)
    return copycat_engine


def test_publications_of_unfit_drafts_are_refused_and_a_skipped_swap_raises(copycat, engine,
                                                                          monkeypatch):
    _, draft, _ = copycat
    pub = DraftChannel(engine)
    other = swap_state(draft, seed=7)
    assert draft_problem(other, draft.state) is None
    zeroed = jax.tree.map(lambda x: jnp.zeros_like(x)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, other)
    nan = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                       if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x, other)
    for bad, why in [(zeroed, "zero"), (nan, "non-finite"),
                     (jax.tree.map(jnp.copy, draft.state), "stale")]:
        with pytest.raises(DraftRefused, match=why):
            pub.publish(bad)
        assert engine.draft_version == 0 and engine.draft_state is draft.state
    assert pub.publish(other) == 1 and engine.draft_state is other
    # A rollback (the guard serving version 0 again) never makes version numbers repeat.
    engine.set_draft(draft.state, version=0)
    assert pub.publish(swap_state(draft, seed=8)) == 2
    # An engine that ignores the swap (the SGLang #27718 class of bug) is caught at once.
    monkeypatch.setattr(engine, "set_draft", lambda state, version=None: None)
    with pytest.raises(SwapError, match="did not take"):
        pub.publish(swap_state(draft, seed=9))


class _Direct:
    """Stands in for the asyncio loop a server's tickets post to: events land in a queue."""

    @staticmethod
    def call_soon_threadsafe(fn, *args):
        fn(*args)


WAIT_S = 300
"""Seconds a test waits for the serving loop's next event: its first steps compile programs,
tens of seconds on a loaded 2-core machine."""


def _serve(loop: ServingLoop, prompts, max_new: int) -> list:
    tickets = [Ticket(Request(p, max_new), TextStream(lambda ids: "", []), queue.Queue(),
                      _Direct()) for p in prompts]  # type: ignore[arg-type]
    for ticket in tickets:
        loop.submit(ticket)
    results = []
    for i, ticket in enumerate(tickets):
        while True:
            try:
                event = ticket.events.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"request {i} of {len(tickets)} got no event in {WAIT_S} s "
                            f"(the loop's error: {loop.error!r})")
            if event[0] == "end":
                break
            assert event[0] == "delta", event
        results.append(event[2])
    return results


def test_the_guard_rolls_back_a_random_draft_while_serving_losslessly(copycat, engine):
    """The copycat draft accepts everything (tau = depth + 1); a random draft of the same
    shape published mid-traffic accepts nothing, is rolled back within min_rows rows and a
    step or two, and every output stays the target's."""
    target, draft, _ = copycat
    metrics = ServerMetrics(3)
    loop = ServingLoop({"spec": engine}, metrics, max_queue=32,
                       guard=GuardConfig(min_rows=16)).start()
    assert loop.ready.wait(WAIT_S), f"the serving loop was not ready in {WAIT_S} s: {loop.error!r}"
    reference = TargetGenerator(target, eos_ids=engine.eos_ids)
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(3, 40, size=5)] for _ in range(16)]
    want = [c.token_ids for c in reference.generate(prompts, 24).completions]
    try:
        first = _serve(loop, prompts[:6], 24)
        steps = sum(r.steps for r in first)
        assert sum(r.accepted for r in first) >= 2 * steps  # tau >= 3 of at most 4
        loop.channel.offer(swap_state(draft, seed=3))  # version 1
        rest = _serve(loop, prompts[6:], 24)
    finally:
        loop.shutdown(5)
    assert [r.token_ids for r in first + rest] == want
    assert loop.rollbacks == 1 and loop.guard.rolled_back.keys() == {1}
    assert engine.draft_version == 0 and engine.draft_state is draft.state
    rows_of_v1 = loop.batchers["spec"].by_version[1][0]
    assert 16 <= rows_of_v1 <= 16 + 2 * 2  # judged at min_rows; a step in flight or two more
    late = rest[-4:]
    assert all(r.draft_versions == {0} for r in late)
    assert sum(r.accepted for r in late) > 2 * sum(r.steps for r in late)
    assert metrics.rollbacks._value.get() == 1


def test_a_rolled_back_version_is_never_swapped_in_again_nor_trained_on(copycat, engine,
                                                                        tmp_path):
    """Across processes: the engine's watcher refuses the version the guard rolled back and
    leaves a note; the learner process takes the note, trains on from the newest version
    not rolled back, and a restarted learner does not resume from the bad one."""
    from aurora_jax.store.draft_store import DraftPublisher, DraftWatcher, rejected_versions

    _, draft, _ = copycat
    drafts = tmp_path / "drafts"
    pub = DraftPublisher(drafts, draft.state)
    watcher = DraftWatcher(DraftChannel(engine), drafts, poll_s=3600)
    good, bad = swap_state(draft, seed=1), swap_state(draft, seed=2)
    assert pub.publish(good) == 1 and watcher.poll() == 1
    assert pub.publish(bad) == 2 and watcher.poll() == 2
    engine.set_draft(engine.draft_state, version=1)  # stands in for the guard's rollback
    watcher.refuse(2, "acceptance collapsed")
    assert watcher.poll() is None and engine.draft_version == 1
    assert rejected_versions(drafts) == {2: "acceptance collapsed"}
    (bad_version, state), = pub.take_rejections()
    assert bad_version == 2 and bool(jax.tree.reduce(
        lambda a, b: a and b, jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), state,
                                           good)))
    assert pub.take_rejections() == []  # each note is taken once
    assert pub.publish(swap_state(draft, seed=3)) == 3  # numbers never repeat
    pub.close()
    assert DraftPublisher(drafts, draft.state).resume()[0] == 3
    rejected_only = tmp_path / "other"
    p2 = DraftPublisher(rejected_only, draft.state)
    p2.publish(good)
    p2.publish(bad)
    DraftWatcher(DraftChannel(engine), rejected_only).refuse(2, "collapsed")
    assert DraftPublisher(rejected_only, draft.state).resume()[0] == 1


def test_the_learner_trains_on_from_the_rolled_back_draft_with_fresh_moments(monkeypatch):
    """OnlineLearner.roll_back: at its next step the learner starts from the given draft
    (not from the state that collapsed), with zeroed optimizer moments and its step count
    kept; that step then moves the weights away from the given draft as a first step does.
    The step is the learner's own `train_step`, which must apply the pending reset itself."""
    from spec_models import random_pair

    from aurora_jax.engine.engine import Engine
    from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer
    from aurora_jax.learn.learner import Learner
    from aurora_jax.learn.losses import LossConfig
    from aurora_jax.learn.online import OnlineConfig, OnlineLearner

    target, draft = random_pair(tiny_cfg(eos=()), seed=11)
    spec = SpecConfig(mode="chain", depth=3)
    buffer = TraceBuffer()
    engine = Engine(target, draft, spec, max_slots=4, max_len=64,
                    trace_sink=TraceAssembler(buffer.add))
    rng = np.random.default_rng(1)
    engine.run([Request([int(x) for x in rng.integers(3, 40, size=6)], 24) for _ in range(8)])
    engine.traces.flush()
    learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=3))
    online = OnlineLearner(learner, buffer, DraftChannel(engine), spec.nodes + 1,
                           OnlineConfig(batch_size=2, seq_len=16, trees_per_seq=2,
                                        min_sequences=2, every_steps=1000))
    for _ in range(3):
        online.train_step()
    trusted = engine.draft_state
    online.roll_back(trusted, bad_version=1)
    fresh = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=3))
    fresh.state = fresh.state.replace(step=learner.state.step)  # the same schedule point
    fresh.reset_to(trusted)
    before = int(learner.state.step)
    batches = []  # the batch train_step draws, to give the fresh learner the same one
    draw = online._batch
    monkeypatch.setattr(online, "_batch", lambda: batches.append(draw()) or batches[-1])
    online.train_step()  # applies the pending reset, then steps
    m_rolled = online.last_metrics
    (batch,) = batches
    m_fresh = fresh.step(batch)
    assert int(learner.state.step) == before + 1 and online.rollbacks == 1
    assert online._reset_to is None
    np.testing.assert_allclose(float(m_rolled["loss"]), float(m_fresh["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(learner.state.params), jax.tree.leaves(fresh.state.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # A second rollback is taken as the first: pending until the next step, then applied.
    online.roll_back(trusted, bad_version=2)
    online.train_step()
    assert online._reset_to is None and online.rollbacks == 2

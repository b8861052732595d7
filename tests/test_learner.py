"""The learner trains a draft from the engine's own traces, and the engine takes it live."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest
from spec_models import random_pair, tiny_cfg

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer, TracedSequence
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.speculative.config import SpecConfig

SPEC = SpecConfig(mode="tree", depth=4, topk=3, num_draft_tokens=8)


def _prompts(n, seed):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 40, size=rs.randint(4, 12)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    return random_pair(tiny_cfg(eos=()), seed=11)


def test_learning_from_traces_raises_acceptance(pair):
    target, draft = pair
    buffer = TraceBuffer()
    engine = Engine(target, draft, SPEC, max_slots=8, max_len=64,
                    trace_sink=TraceAssembler(buffer.add))
    served = engine.run([Request(p, 40) for p in _prompts(32, seed=1)])
    engine.traces.flush()
    assert len(buffer) == 32 and buffer.stats.dropped_for_space == 0
    learner = Learner(draft, target, LossConfig(ttt_steps=4, lambda_discard=0.5, tree_depth=4))
    first = last = None
    for _ in range(300):
        m = learner.step(buffer.batch(8, 48, 8, SPEC.nodes + 1))
        first = first or {k: float(v) for k, v in m.items()}
        last = m
    assert float(last["loss"]) < 0.5 * first["loss"]
    assert float(last["sim_acceptance_length"]) > first["sim_acceptance_length"] + 1.0

    held_out = [Request(p, 40) for p in _prompts(8, seed=2)]
    before = engine.run(held_out)
    engine.set_draft(learner.publish())
    after = engine.run(held_out)
    assert [r.token_ids for r in after.results] == [r.token_ids for r in before.results]
    print(f"acceptance: served {served.acceptance_length:.2f}, random draft "
          f"{before.acceptance_length:.2f}, after 300 steps {after.acceptance_length:.2f}")
    assert after.acceptance_length > before.acceptance_length + 1.0


def test_online_swaps_keep_serving_lossless(pair):
    """The learner trains between engine steps and the engine takes each new draft while
    other requests are in flight: no recompilation, every request completes, greedy output
    equals target-only. Every request is admitted at once, so which admission groups (and
    prefill shapes) occur does not depend on how fast each draft lets requests finish."""
    target, draft = pair
    buffer = TraceBuffer()
    prompts = _prompts(10, seed=3)
    engine = Engine(target, draft, SPEC, max_slots=len(prompts), max_len=64,
                    trace_sink=TraceAssembler(buffer.add))
    learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=4))
    engine.run([Request(p, 24) for p in prompts])  # warm-up (same admission group), traces
    engine.traces.flush()
    compiled = engine.compilations

    def learn_and_swap(_result):
        for _ in range(3):
            learner.step(buffer.batch(4, 32, 4, SPEC.nodes + 1))
        engine.set_draft(learner.publish())

    run = engine.run([Request(p, 24) for p in prompts], on_result=learn_and_swap)
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 24)
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref.completions]
    assert engine.compilations == compiled
    assert engine.draft_version == 10


def _seq(nbytes_tokens: int, version=0) -> TracedSequence:
    n = nbytes_tokens // 4
    return TracedSequence(0, None, version, np.zeros(n, np.int32), np.zeros((n, 3, 0), np.float32),
                    np.zeros((n, 0), np.float32), [])


def test_buffer_stays_within_its_byte_bound_under_a_fast_producer():
    buffer = TraceBuffer(max_bytes=10_000, max_staleness=2)
    stop = threading.Event()
    peak = []

    def produce():
        for i in range(2000):
            buffer.add(_seq(400, version=i // 500))
        stop.set()

    t = threading.Thread(target=produce)
    t.start()
    while not stop.is_set():
        peak.append(buffer.stats.bytes)
    t.join()
    assert max(peak + [buffer.stats.bytes]) <= 10_000
    assert buffer.stats.added == 2000
    assert buffer.stats.dropped_for_space == 2000 - len(buffer) > 0
    buffer.drop_stale(current_version=6)  # keeps versions >= 4: none left (newest is 3)
    assert len(buffer) == 0 and buffer.stats.dropped_stale == 25


def test_buffer_holds_out_the_newest_sequences():
    """The "better" policy compares drafts on the newest sequences; training never draws
    them."""
    buffer = TraceBuffer(seed=1)
    for i in range(10):
        buffer.add(TracedSequence(i, None, 0, np.full(6, i, np.int32),
                            np.zeros((6, 3, 2), np.float32), np.zeros((6, 2), np.float32), []))
    train = buffer.batch(64, 4, 1, 3, recent=3)
    held = buffer.batch(64, 4, 1, 3, recent=3, held_out=True)
    assert set(np.asarray(train.tokens[:, 0]).tolist()) == set(range(7))
    assert set(np.asarray(held.tokens[:, 0]).tolist()) == {7, 8, 9}
    with pytest.raises(ValueError, match="no sequences"):
        buffer.batch(4, 4, 1, 3, recent=10)


@pytest.mark.parametrize("policy", ["every", "better"])
def test_online_learner_thread_publishes_while_serving(pair, policy):
    """A learner thread trains on the traffic the engine serves and swaps drafts in while it
    serves; every request completes with the target's own greedy output."""
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.stack import online_engine

    target, draft = pair
    learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=4))
    cfg = OnlineConfig(batch_size=4, seq_len=32, trees_per_seq=4, min_sequences=3,
                       holdout=1, every_steps=5, policy=policy, max_steps=40)
    engine, online = online_engine(target, draft, SPEC, learner, cfg, max_slots=4, max_len=64)
    prompts = _prompts(24, seed=4)
    done = []

    def halfway_wait_for_a_decision(_result):
        # On a busy machine the engine could finish before the learner decides once; holding
        # the host loop at request 12 makes the rest of the run certain to follow a decision.
        done.append(1)
        deadline = time.time() + 120
        while (len(done) == 12 and online.published + online.rejected == 0
               and online.error is None and time.time() < deadline):
            time.sleep(0.05)

    online.start()
    run = engine.run([Request(p, 32) for p in prompts], on_result=halfway_wait_for_a_decision)
    online.stop()
    assert online.error is None and online.steps > 0
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 32)
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref.completions]
    assert online.published + online.rejected == online.steps // cfg.every_steps
    assert engine.draft_version == online.published
    assert online.published + online.rejected >= 1
    if policy == "every":
        assert online.published >= 1
        late = {v for r in run.results[12:] for v in r.draft_versions}
        assert max(late) >= 1  # requests after the swap were drafted by a published draft


@pytest.fixture(scope="module")
def copycat_engine():
    """A copycat target (greedy successor a fixed map of the token) served by a tracing
    engine, with its exact draft and a random one (`useless`) of the same structure. The
    engine's traces go to `buffer` (sequences) and `steps` (every step's VerifyTrace). Tests
    set the serving draft they need first."""
    import dataclasses

    from spec_models import copycat_pair, swap_state

    target, exact, _ = copycat_pair(tiny_cfg(eos=()), eos_sources=0)
    useless = dataclasses.replace(exact, state=swap_state(exact, seed=3))
    buffer, steps = TraceBuffer(), []
    assemble = TraceAssembler(buffer.add)

    def sink(trace):
        steps.append(trace)
        assemble(trace)

    engine = Engine(target, exact, SPEC, max_slots=2, max_len=64, trace_sink=sink)
    return dict(target=target, exact=exact, useless=useless, engine=engine, buffer=buffer,
                steps=steps)


def test_a_swap_mid_stream_changes_what_is_served(copycat_engine):
    """A random draft serves first; after two requests finish, the exact draft is swapped in
    while others are in flight. Every step drafted by the random draft accepts about nothing
    (tau near 1), every step drafted by the exact one accepts a whole path (tau = depth + 1),
    so the version labels are the drafts that really served; the output stays the target's."""
    from aurora_jax.engine.trace import VerifyTrace

    c = copycat_engine
    engine, target = c["engine"], c["target"]
    engine.set_draft(c["useless"].state, version=0)
    prompts = _prompts(6, seed=7)
    finished = []

    def swap_after_two(_result):
        finished.append(1)
        if len(finished) == 2:
            engine.set_draft(c["exact"].state)  # version 1

    c["steps"].clear()
    run = engine.run([Request(p, 21) for p in prompts], on_result=swap_after_two)
    engine.traces.flush()
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 21)
    assert [r.token_ids for r in run.results] == [t.token_ids for t in ref.completions]
    accepted = {0: [], 1: []}  # per draft version, every active slot-step's accepted count
    for t in c["steps"]:
        if isinstance(t, VerifyTrace):
            accepted[t.draft_version] += np.asarray(t.accepted)[np.asarray(t.active)].tolist()
    print(f"steps per version: {len(accepted[0])}, {len(accepted[1])}; tau "
          f"{1 + np.mean(accepted[0]):.2f}, {1 + np.mean(accepted[1]):.2f}")
    assert len(accepted[0]) >= 20 and len(accepted[1]) >= 10
    assert 1 + np.mean(accepted[0]) < 1.5
    assert set(accepted[1]) == {SPEC.depth}
    # Per request: those served by one version only show the same.
    by_version = {v: [r.acceptance_length for r in run.results if r.draft_versions == {v}]
                  for v in (0, 1)}
    assert by_version[0] and max(by_version[0]) < 2.0
    assert by_version[1] and set(by_version[1]) == {SPEC.depth + 1}


def test_better_policy_rejects_a_worse_draft_and_publishes_a_better_one(copycat_engine):
    """Policy "better" on drafts whose ranking is known, scored on the same held-out traffic:
    serving the exact draft, a random candidate is rejected and the engine keeps serving the
    exact draft; serving the random draft, the exact candidate is published. A comparison
    turned the wrong way, or a policy that always (or never) publishes, fails one of the
    two."""
    from aurora_jax.engine.channel import DraftChannel
    from aurora_jax.learn.online import OnlineConfig, OnlineLearner

    c = copycat_engine
    engine = c["engine"]
    engine.set_draft(c["exact"].state, version=0)
    engine.run([Request(p, 24) for p in _prompts(4, seed=6)])  # traffic to score on
    engine.traces.flush()
    cfg = OnlineConfig(batch_size=4, seq_len=32, trees_per_seq=4, min_sequences=3, holdout=2,
                       every_steps=1, policy="better")
    loss = LossConfig(ttt_steps=2, tree_depth=4)
    for serving, candidate, better in (("exact", "useless", False), ("useless", "exact", True)):
        engine.set_draft(c[serving].state, version=0)
        learner = Learner(c[candidate], c["target"], loss)
        online = OnlineLearner(learner, c["buffer"], DraftChannel(engine), SPEC.nodes + 1,
                               cfg)
        assert online.ready()
        online._maybe_publish()  # the attempt train_step makes every `every_steps` steps
        assert (online.published, online.rejected) == ((1, 0) if better else (0, 1))
        assert engine.draft_version == int(better)
        if better:
            served = jax.tree.leaves(engine.draft_state)
            assert all(np.array_equal(a, b)
                       for a, b in zip(served, jax.tree.leaves(learner.publish()), strict=True))
        else:
            assert engine.draft_state is c["exact"].state
        # Either way the exact draft serves next: every step accepts a whole path.
        assert engine.run([Request(p, 21) for p in _prompts(2, seed=8)]).acceptance_length \
            == SPEC.depth + 1


def test_failing_learner_leaves_the_engine_serving_its_last_draft(pair):
    """A learner step that raises (say, a NaN check) ends the learner thread with a logged
    error; the engine keeps the last draft it published and keeps serving losslessly."""
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.stack import online_engine

    target, draft = pair
    learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=4))
    real_step, calls = learner.step, []

    def failing_step(batch):
        calls.append(1)
        if len(calls) > 4:
            raise FloatingPointError("non-finite draft loss")
        return real_step(batch)

    learner.step = failing_step
    cfg = OnlineConfig(batch_size=4, seq_len=32, trees_per_seq=4, min_sequences=2,
                       every_steps=2)
    engine, online = online_engine(target, draft, SPEC, learner, cfg, max_slots=4, max_len=64)
    prompts = _prompts(8, seed=5)
    online.start()
    engine.run([Request(p, 24) for p in prompts])
    online._thread.join(timeout=300)  # it trains on what was served until the failure
    assert isinstance(online.error, FloatingPointError) and online.steps == 4
    assert engine.draft_version == online.published == 2
    run = engine.run([Request(p, 24) for p in prompts])
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 24)
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref.completions]
    assert all(r.draft_versions == {2} for r in run.results)


def test_interleaved_learning_raises_acceptance_on_a_short_stream(pair):
    """The interleaved schedule (learner steps between requests, what `generate --online` does
    by default): on a stream of 24 requests the draft learns and is swapped in while serving,
    so the last requests are accepted longer than the first, and every output is still the
    target's."""
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.stack import online_engine

    target, draft = pair
    learner = Learner(draft, target, LossConfig(ttt_steps=4, lambda_discard=0.5, tree_depth=4))
    engine, online = online_engine(target, draft, SPEC, learner, OnlineConfig(
        batch_size=8, seq_len=48, min_sequences=2, every_steps=10), max_slots=2, max_len=64)
    prompts = _prompts(24, seed=3)
    run = engine.run([Request(p, 40) for p in prompts],
                     on_result=lambda _: online.train_steps(12))
    taus = [r.acceptance_length for r in run.results]
    assert online.steps > 200 and online.published >= 20
    print(f"tau: first 6 requests {np.mean(taus[:6]):.2f}, last 6 {np.mean(taus[-6:]):.2f}")
    assert np.mean(taus[-6:]) > np.mean(taus[:6]) + 0.5, taus
    ref = TargetGenerator(target).generate(prompts, 40).completions
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref]


def test_learner_simulates_the_acceptance_the_engine_served():
    """Train/serve agreement: the learner's simulated chain acceptance (draft_loss, over the
    engine's own traces) matches what the engine measured serving them with the same draft.
    An exact draft (copycat) is right at every teacher-forced first step (tau 2 at TTT 1) and
    nearly every unrolled one (the first rows start in the 2-token prompt, which is not the
    target's own path); a draft that is wrong now and then (noisy copycat) is simulated
    within a quarter token of its served tau. A position off by one in either convention
    would put these near 1."""
    import jax.numpy as jnp
    from flax import nnx
    from spec_models import copycat_pair, noisy_copycat_pair

    from aurora_jax.learn.learner import target_head
    from aurora_jax.learn.losses import draft_loss

    spec = SpecConfig(mode="chain", depth=3)
    for name, (target, draft, *_) in (
            ("copycat", copycat_pair(tiny_cfg(eos=()), eos_sources=0)),
            ("noisy", noisy_copycat_pair(tiny_cfg(eos=())))):
        buffer = TraceBuffer()
        engine = Engine(target, draft, spec, max_slots=2, max_len=96, eos_ids=(),
                        trace_sink=TraceAssembler(buffer.add))
        rs = np.random.RandomState(0)
        served = engine.run([Request(rs.randint(3, 40, size=2).tolist(), 48)
                             for _ in range(8)]).acceptance_length
        engine.traces.flush()
        embed, head = target_head(target)
        model = nnx.merge(draft.graphdef, draft.state)
        sim = {}
        for ttt in (1, 3):
            batch = buffer.batch(8, 40, 4, spec.nodes + 1)
            _, m = draft_loss(model, embed, lambda h, w=head: (h @ w).astype(jnp.float32), batch,
                              LossConfig(ttt_steps=ttt, tree_depth=3))
            sim[ttt] = float(m["sim_acceptance_length"])
        print(f"{name}: served tau {served:.2f}, simulated {sim}")
        if name == "copycat":
            assert served == 4.0 and sim[1] == 2.0 and sim[3] >= 3.9
        else:
            assert 1.5 < served < 3.5 and abs(sim[3] - served) <= 0.25


def test_a_batch_drawn_with_another_generator_leaves_the_training_order_alone():
    """Scoring batches (the run's fresh acceptance) draw with their own generator, so adding
    them does not change which batches the learner trains on."""
    def seq(i):
        n = 6
        return TracedSequence(i, None, 0, np.arange(i, i + n, dtype=np.int32),
                        np.zeros((n, 3, 4), np.float32), np.zeros((n, 4), np.float32), [])

    a, b = TraceBuffer(seed=3), TraceBuffer(seed=3)
    for i in range(10):
        a.add(seq(i))
        b.add(seq(i))
    b.batch(4, 4, 1, 3, recent=3, held_out=True, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(np.asarray(a.batch(4, 4, 1, 3).tokens),
                                  np.asarray(b.batch(4, 4, 1, 3).tokens))


def test_a_cancelled_request_still_becomes_a_training_sequence(pair):
    """A request ended early (a client gone, a stop string) closes its traced sequence with
    what it committed, instead of leaving it open in the assembler for ever."""
    target, draft = pair
    sequences: list[TracedSequence] = []
    assembler = TraceAssembler(sequences.append)
    engine = Engine(target, draft, SPEC, max_slots=2, max_len=64, eos_ids=(),
                    trace_sink=assembler)
    loop = engine.batcher()
    long, short = loop.submit(Request([5, 6, 7, 8], 40, id="long")), \
        loop.submit(Request([9, 10, 11], 6, id="short"))
    while len(loop.results[long].token_ids) < 10:
        loop.step()
    loop.cancel(long, "stop")
    loop.run_until_idle()
    engine.traces.flush()
    assert loop.results[long].finish_reason == "stop"
    assert loop.results[short].finish_reason == "length"
    assert sorted(s.request_id for s in sequences) == ["long", "short"]
    cut = next(s for s in sequences if s.request_id == "long")
    committed = loop.results[long].token_ids
    # The prompt, then what was committed before the cancel (the features of each position).
    assert cut.tokens.tolist() == ([5, 6, 7, 8] + committed)[:len(cut.tokens)]
    assert len(cut.tokens) >= 4 + 10 - 1 and len(cut.aux) == len(cut.tokens)
    assert not assembler._open

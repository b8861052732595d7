"""The online learner re-chooses the draft vocabulary from the served tokens: the new
vocabulary covers the frequent tokens, staying head rows keep their weights and optimizer
moments, shapes never change, and serving stays lossless with nothing recompiled."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from spec_models import random_pair, tiny_cfg

from aurora_jax.engine.engine import Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig
from aurora_jax.learn.vocab_refresh import (
    VocabRefreshConfig,
    choose_vocab,
    draft_ids,
    entering_rows,
    outside_share,
)
from aurora_jax.models.eagle3 import DraftConfig, init_draft
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.stack import online_engine

SPEC = SpecConfig(mode="tree", depth=4, topk=3, num_draft_tokens=8)
VOCAB, DRAFT_VOCAB = 40, 12


@pytest.mark.parametrize("seed", range(5))
def test_chosen_vocabulary_covers_the_most_frequent_tokens(seed):
    rs = np.random.default_rng(seed)
    stream = rs.zipf(1.3, size=5000) % VOCAB
    counts = np.bincount(stream, minlength=VOCAB)
    current = np.sort(rs.choice(VOCAB, DRAFT_VOCAB, replace=False))
    new = choose_vocab(counts, current, always=(1,))
    assert len(new) == DRAFT_VOCAB and np.all(np.diff(new) > 0) and 1 in new
    cut = np.sort(counts[new[new != 1]])[0]  # the least counted token chosen on merit
    outside = np.setdiff1d(np.arange(VOCAB), new)
    assert np.all(counts[outside] <= cut)  # nothing left out is more frequent
    # ties at the cut go to current members first
    tied_out = outside[counts[outside] == cut]
    tied_in = new[(counts[new] == cut) & (new != 1)]
    if len(tied_out) and len(tied_in):
        assert not (np.isin(tied_out, current).any() and not np.isin(tied_in, current).all())
    best = np.sort(np.argsort(-counts, kind="stable")[: DRAFT_VOCAB - 1])
    assert outside_share(counts, new) <= outside_share(counts, np.union1d(best, [1])) + 1e-12


def test_an_unchanged_vocabulary_is_chosen_when_it_already_covers_everything():
    counts = np.zeros(VOCAB, np.int64)
    current = np.arange(5, 5 + DRAFT_VOCAB)
    counts[current[:4]] = 7  # the traffic uses only members
    assert np.array_equal(choose_vocab(counts, current), current)


def test_entering_rows_follow_the_map_from_target_rows_to_draft_rows():
    rs = np.random.default_rng(0)
    target_head = rs.normal(size=(8, VOCAB))
    a = rs.normal(size=(8, 6))
    head = (target_head.T @ a).T  # the draft head is an exact linear image of the target's
    kept = np.arange(0, 30)
    new = np.arange(30, 40)
    got = entering_rows(head[:, kept], target_head, kept, np.arange(30), new)
    np.testing.assert_allclose(got, head[:, new], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def traffic():
    """A target, prompts and the target's greedy outputs (what serving will commit)."""
    cfg = tiny_cfg(vocab=VOCAB, eos=())
    target, _ = random_pair(cfg, seed=11)
    rs = np.random.RandomState(4)
    prompts = [rs.randint(3, VOCAB, size=rs.randint(4, 12)).tolist() for _ in range(16)]
    ref = [c.token_ids for c in TargetGenerator(target, eos_ids=()).generate(prompts, 32)
           .completions]
    return cfg, target, prompts, ref


def test_vocabulary_swap_from_traffic_is_lossless_and_compiles_nothing(traffic):
    """A day-0 draft whose vocabulary holds the tokens the target emits least: it can hardly
    propose what the target says. The online learner re-chooses the vocabulary from what was
    served and hot-swaps it in: the served vocabulary then covers the frequent tokens, greedy
    outputs stay the target's, and no jitted function (engine or learner) compiles again."""
    cfg, target, prompts, ref = traffic
    emitted = np.bincount(np.concatenate(ref), minlength=VOCAB)
    day0 = np.sort(np.argsort(emitted, kind="stable")[:DRAFT_VOCAB])
    dcfg = dataclasses.replace(DraftConfig.for_target(cfg), draft_vocab_size=DRAFT_VOCAB)
    draft = init_draft(dcfg, seed=3, draft_to_target=day0)
    learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=4))
    online_cfg = OnlineConfig(batch_size=4, seq_len=32, trees_per_seq=4, min_sequences=2,
                              every_steps=5, vocab=VocabRefreshConfig(min_tokens=100))
    engine, online = online_engine(target, draft, SPEC, learner, online_cfg, max_slots=2,
                                   max_len=64)
    greedy = [Request(p, 32) for p in prompts]
    first = engine.run(greedy)
    engine.traces.flush()
    assert [r.token_ids for r in first.results] == ref
    online.train_steps(5)  # the first publication attempt re-chooses, then publishes
    compiled, learner_compiled = engine.compilations, learner._step._cache_size()

    (change,) = online.vocab_changes
    served = online.counts.snapshot()
    assert change["outside_after"] < change["outside_before"] and change["entering"] > 0
    new = draft_ids(engine.draft_state["d2t"][...])
    assert engine.draft_version == 1 and not np.array_equal(new, day0)
    assert np.array_equal(np.flatnonzero(np.asarray(engine.draft_state["t2d"][...])), new)
    assert np.all(served[np.setdiff1d(np.arange(VOCAB), new)] <= served[new].min())
    assert outside_share(served, new) == pytest.approx(change["outside_after"])

    finite = jax.tree.map(lambda x: bool(np.isfinite(np.asarray(x)).all()),
                          (learner.state, engine.draft_state))
    assert all(jax.tree.leaves(finite))
    online.train_steps(20)
    again = engine.run(greedy)
    assert [r.token_ids for r in again.results] == ref
    assert (engine.compilations, learner._step._cache_size()) == (compiled, learner_compiled)
    print(f"acceptance: day-0 vocabulary {first.acceptance_length:.2f}, re-chosen and 25 "
          f"steps {again.acceptance_length:.2f}")
    assert again.acceptance_length > first.acceptance_length


def test_staying_rows_keep_weights_and_moments(traffic):
    cfg, target, _, _ = traffic
    dcfg = dataclasses.replace(DraftConfig.for_target(cfg), draft_vocab_size=DRAFT_VOCAB)
    old = np.arange(0, 2 * DRAFT_VOCAB, 2)
    learner = Learner(init_draft(dcfg, seed=1, draft_to_target=old), target, LossConfig())
    head = lambda s: np.asarray(s.params["lm_head"]["kernel"][...])  # noqa: E731
    moments = lambda s: [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(  # noqa: E731
        s.opt_state) if "['lm_head']['kernel']" in jax.tree_util.keystr(p)]
    before_head, before_mom = head(learner.state), moments(learner.state)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), (learner.state, learner.buffers))
    new = np.union1d(old[:8], [5, 7, 9, 11])
    change = learner.set_vocab(new)
    assert change.entering == 4
    assert jax.tree.map(lambda x: (x.shape, x.dtype), (learner.state, learner.buffers)) == shapes
    col = {int(t): i for i, t in enumerate(new)}
    for i, t in enumerate(old[:8]):
        np.testing.assert_array_equal(head(learner.state)[:, col[int(t)]], before_head[:, i])
        for m0, m1 in zip(before_mom, moments(learner.state), strict=True):
            np.testing.assert_array_equal(m1[:, col[int(t)]], m0[:, i])
    assert np.array_equal(draft_ids(learner.buffers["d2t"][...]), new)
    assert np.flatnonzero(np.asarray(learner.buffers["t2d"][...])).tolist() == new.tolist()


def test_a_late_listener_counts_every_held_sequence_once():
    """A learner that starts after traces arrived (a learner process following a store)
    still counts what the buffer holds, and nothing twice."""
    from aurora_jax.learn.buffer import TraceBuffer, TracedSequence
    from aurora_jax.learn.vocab_refresh import TokenCounts

    def seq(tokens):
        n = len(tokens)
        return TracedSequence("r", None, 0, np.asarray(tokens, np.int32),
                        np.zeros((n, 3, 4), np.float32), np.zeros((n, 4), np.float32), [])

    buffer = TraceBuffer()
    buffer.add(seq([1, 2]))
    buffer.add(seq([2, 3]))
    counts = TokenCounts(6)
    buffer.listen(lambda s: counts.add(s.tokens))
    buffer.add(seq([3, 5]))
    assert counts.snapshot().tolist() == [0, 1, 2, 2, 0, 1]

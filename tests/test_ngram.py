"""N-gram (prompt lookup) drafting: the lookup finds what a plain loop finds; the engine's
greedy output stays exactly the target's (sampled: test_spec_sampling.py); a sequence that
repeats itself is accepted in long runs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import copycat_pair, greedy_path, noisy_copycat_pair, tiny_cfg

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.speculative.ngram import RECENT_MIN_NGRAM, archive, lookup, oldest_first


def lookup_reference(seq: list[int], depth: int, max_ngram: int, recent=()):
    """The loop the device code must equal: longest suffix first, most recent match; at each
    length the sequence itself first, then the recent sequences (newest first)."""
    n = len(seq)
    for g in range(max_ngram, 0, -1):
        if n <= g:
            continue
        suffix = seq[n - g:]
        refs = [seq[:n]] + (list(reversed(recent)) if g >= RECENT_MIN_NGRAM else [])
        for ref in refs:
            for j in range(len(ref) - g - 1, -1, -1):  # j + g <= len - 1: a known next token
                if ref[j:j + g] == suffix:
                    cont = ref[j + g: j + g + depth]
                    return cont + [None] * (depth - len(cont))
    return [None] * depth


def test_lookup_equals_the_loop_reference():
    rs = np.random.RandomState(0)
    s, depth, max_ngram = 48, 4, 3
    seqs = []
    for _ in range(200):
        n = rs.randint(1, s)
        seqs.append(rs.randint(0, rs.choice([3, 5, 12]), size=n).tolist())  # small alphabets
    hist = np.full((len(seqs), s), 7, np.int32)  # garbage past each length
    for i, q in enumerate(seqs):
        hist[i, : len(q)] = q
    lengths = jnp.asarray([len(q) for q in seqs], jnp.int32)
    tokens, valid = lookup(jnp.asarray(hist), lengths, depth, max_ngram)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    found = 0
    for i, q in enumerate(seqs):
        want = lookup_reference(q, depth, max_ngram)
        assert valid[i].tolist() == [w is not None for w in want], (q, want)
        assert [t for t, ok in zip(tokens[i], valid[i], strict=True) if ok] == \
            [w for w in want if w is not None]
        found += valid[i, 0]
    assert 20 < found < len(seqs)  # both outcomes are exercised


def test_lookup_in_recent_sequences_equals_the_loop_reference():
    """Other requests' sequences, kept in a ring that `archive` fills: a suffix the sequence
    lacks is found in them, the newest first."""
    rs = np.random.RandomState(1)
    s, depth, max_ngram, m = 40, 3, 3, 4
    ring, ring_len, nxt = jnp.zeros((m, s), jnp.int32), jnp.zeros((m,), jnp.int32), 0
    finished = []
    for _ in range(6):  # six sequences finish, two at a time: the ring keeps the newest four
        seqs = [rs.randint(0, 6, size=rs.randint(5, s)).tolist() for _ in range(2)]
        hist = np.zeros((3, s), np.int32)
        for i, q in enumerate(seqs):
            hist[i, : len(q)] = q
        done = jnp.array([True, True, False])  # the third slot is still running
        ring, ring_len, nxt = archive(ring, ring_len, nxt, jnp.asarray(hist),
                                      jnp.asarray([len(q) for q in seqs] + [9]), done)
        finished += seqs
    recent = finished[-m:]
    r_tokens, r_len = oldest_first(ring, ring_len, nxt)
    assert [np.asarray(r_tokens[i, : int(r_len[i])]).tolist() for i in range(m)] == recent
    queries = [rs.randint(0, 6, size=rs.randint(1, s)).tolist() for _ in range(150)]
    hist = np.full((len(queries), s), 7, np.int32)
    for i, q in enumerate(queries):
        hist[i, : len(q)] = q
    tokens, valid = lookup(jnp.asarray(hist), jnp.asarray([len(q) for q in queries]), depth,
                           max_ngram, r_tokens, r_len)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    from_recent = 0
    for i, q in enumerate(queries):
        want = lookup_reference(q, depth, max_ngram, recent)
        assert valid[i].tolist() == [w is not None for w in want], (q, want)
        assert [t for t, ok in zip(tokens[i], valid[i], strict=True) if ok] == \
            [w for w in want if w is not None]
        from_recent += want != lookup_reference(q, depth, max_ngram)
    assert from_recent > 10  # the recent sequences decide a good share of the lookups


@pytest.fixture(scope="module")
def noisy():
    return noisy_copycat_pair(tiny_cfg())


@pytest.fixture(scope="module")
def ngram_engine(noisy):
    return Engine(noisy[0], None, SpecConfig(mode="ngram", depth=4), max_slots=3, max_len=128)


def test_greedy_output_is_the_targets(noisy, ngram_engine):
    target = noisy[0]
    rs = np.random.RandomState(3)
    # Prompts that repeat a phrase (lookups hit) and random ones (lookups mostly miss).
    phrase = rs.randint(3, 40, size=6).tolist()
    prompts = [phrase * 3, rs.randint(3, 40, size=9).tolist(), phrase + [5, 6] + phrase,
               rs.randint(3, 40, size=4).tolist()]
    run = ngram_engine.run([Request(p, 40) for p in prompts])
    ref = TargetGenerator(target).generate(prompts, 40).completions
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref]
    assert run.acceptance_length > 1.0


def test_a_sequence_that_repeats_itself_is_accepted_in_long_runs():
    target, _, f = copycat_pair(tiny_cfg(), seed=4, eos_sources=0)
    start = 7
    prompt = [start] + greedy_path(f, start, 40)  # the target's own path: it enters a cycle
    engine = Engine(target, None, SpecConfig(mode="ngram", depth=5), max_slots=1, max_len=160)
    (res,) = engine.run([Request(prompt, 60)]).results
    assert res.token_ids == greedy_path(f, prompt[-1], 60)
    cycle = prompt[::-1].index(prompt[-1], 1)  # the period the path settled into
    # Every lookup proposes the next min(cycle, depth) tokens (a continuation stops at the
    # newest token) and every one is accepted, but in the last, budget-cut step.
    per_step = min(cycle, 5)
    assert res.accepted >= (res.steps - 1) * per_step and res.acceptance_length > per_step


def test_a_request_that_repeats_an_earlier_one_is_accepted_from_its_output(noisy):
    """Served one after another, the second request repeats the first one's prompt: its own
    history has nothing to offer, but the first request's finished sequence holds the whole
    greedy continuation, so (with other requests' sequences kept) nearly every step accepts
    the full depth; without them it does not. Output is the target's either way."""
    target = noisy[0]
    rs = np.random.RandomState(11)
    prompt = rs.randint(3, 40, size=10).tolist()
    ref = TargetGenerator(target).generate([prompt], 30).completions[0].token_ids
    taus = {}
    for kept in (0, 4):
        engine = Engine(target, None, SpecConfig(mode="ngram", depth=4, recent_sequences=kept),
                        max_slots=1, max_len=64)
        first, second = engine.run([Request(prompt, 30), Request(prompt, 30)]).results
        assert first.token_ids == second.token_ids == ref
        taus[kept] = second.acceptance_length
    assert taus[4] > 4.0 > taus[0] + 1.0, taus


def test_recent_sequences_carry_over_between_runs_without_recompiling(noisy):
    """An engine keeps its n-gram references from run to run, as a server does: a prompt
    served again in a later run is accepted from the earlier output; `forget_recent` drops
    them. Nothing compiles again."""
    target = noisy[0]
    rs = np.random.RandomState(12)
    prompt = rs.randint(3, 40, size=10).tolist()
    engine = Engine(target, None, SpecConfig(mode="ngram", depth=4, recent_sequences=4),
                    max_slots=2, max_len=64)
    first = engine.run([Request(prompt, 30)]).results[0]
    compiled = engine.compilations
    again = engine.run([Request(prompt, 30)]).results[0]
    engine.forget_recent()
    fresh = engine.run([Request(prompt, 30)]).results[0]
    assert first.token_ids == again.token_ids == fresh.token_ids
    assert again.acceptance_length > 4.0 > fresh.acceptance_length + 1.0
    assert fresh.acceptance_length == first.acceptance_length
    assert engine.compilations == compiled

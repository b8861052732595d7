"""The engine through the Pallas tree-attention kernel (interpret mode on CPU) computes what it
computes through the jnp reference: step by step, the same drafted trees and tokens, the same
verification logits and draft log-probs, and the same target and draft KV caches (float32,
1e-4). Tokens alone could agree while every cache entry was off."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from spec_models import noisy_copycat_pair, random_pair, tiny_cfg

from aurora_jax.engine.engine import Engine
from aurora_jax.sampling import SamplingParams
from aurora_jax.speculative.config import SpecConfig

SPECS = {"tree": SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=5),
         "chain": SpecConfig(mode="chain", depth=3)}


def _steps(impl, pair, mode, prompts, steps):
    """Prefill `prompts` into slots 0..n-1 and take `steps` engine steps with attention
    `impl`; returns per step (tokens, emitted, accepted, tree tokens, logits at every tree
    node, draft log-probs) and the final decode state."""
    cfg = dataclasses.replace(tiny_cfg(eos=()), attention=impl)
    target, draft = random_pair(cfg, seed=2) if pair == "random" else noisy_copycat_pair(cfg)
    assert target.cfg.attention == draft.cfg.attention == impl
    engine = Engine(target, draft, SPECS[mode], max_slots=len(prompts), max_len=40,
                    trace_sink=lambda _: None)  # traced steps carry the verification states
    model = nnx.merge(target.graphdef, target.state)
    greedy = [SamplingParams()] * len(prompts)
    state = engine.init_decode_state()
    state = engine.insert(engine.prefill(prompts, greedy), state, list(range(len(prompts))),
                          [30] * len(prompts), greedy)
    out = []
    for _ in range(steps):
        state, o = engine.generate(state)
        out.append(jax.device_get((o.tokens, o.emitted, o.accepted, o.trace["tree_tokens"],
                                   model.logits(o.trace["hidden"]), o.trace["draft_logp"])))
    return out, jax.device_get(state)


@pytest.mark.parametrize("pair,mode", [("random", "tree"), ("noisy", "chain")])
def test_engine_steps_through_the_kernel_equal_the_reference(pair, mode):
    """The random pair's target depends on attention everywhere; the noisy pair (a target
    whose attention matters, a draft right on most tokens) commits multi-token paths through
    the kernel's cache reads, with rejections."""
    rs = np.random.RandomState(5)
    prompts = [rs.randint(3, 40, size=n).tolist() for n in (5, 9)]
    ref, ref_state = _steps("reference", pair, mode, prompts, steps=4)
    ker, ker_state = _steps("interpret", pair, mode, prompts, steps=4)
    for r, k in zip(ref, ker, strict=True):
        for exact in range(4):  # committed tokens, counts, drafted trees
            np.testing.assert_array_equal(k[exact], r[exact])
        np.testing.assert_allclose(k[4], r[4], rtol=1e-4, atol=1e-4)  # verification logits
        np.testing.assert_allclose(k[5], r[5], rtol=1e-4, atol=1e-4)  # draft log-probs
    accepted = np.concatenate([r[2] for r in ref])
    if pair == "noisy":
        assert accepted.max() == SPECS[mode].depth and accepted.min() < SPECS[mode].depth
    for slot in range(len(prompts)):
        n, dn = int(ref_state.cache_len[slot]), int(ref_state.draft_len[slot])
        assert (n, dn) == (int(ker_state.cache_len[slot]), int(ker_state.draft_len[slot]))
        for got, want in zip(ker_state.cache.k + ker_state.cache.v,
                             ref_state.cache.k + ref_state.cache.v, strict=True):
            np.testing.assert_allclose(got[slot, :n], want[slot, :n], rtol=1e-4, atol=1e-4)
        for got, want in zip(ker_state.draft_cache.k + ker_state.draft_cache.v,
                             ref_state.draft_cache.k + ref_state.draft_cache.v, strict=True):
            np.testing.assert_allclose(got[slot, :dn], want[slot, :dn], rtol=1e-4, atol=1e-4)

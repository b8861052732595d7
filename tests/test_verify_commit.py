"""Verify a draft tree with the target, commit the accepted path, and keep decoding: the
result equals a plain forward over the committed sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import rng_tokens
from test_tree_accept import random_tree

from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.kv_cache import KVCache, commit_path
from aurora_jax.models.transformer import forward, init_random
from aurora_jax.speculative.accept import greedy_accept
from aurora_jax.speculative.tree import ancestor_mask

CFG = TargetConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8)
fwd = jax.jit(forward, static_argnames="write")


def _greedy(model, seq, steps):
    seq = list(seq)
    for _ in range(steps):
        t = len(seq)
        logits, *_ = fwd(*model, jnp.asarray([seq]), jnp.arange(t)[None],
                         causal_mask(jnp.array([t]), t))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq


def _plant_greedy_path(model, prompt, tokens, parent):
    """Rewrites tokens (in place) along the root-to-deepest-node path to the target's greedy
    continuation, keeping sibling tokens distinct."""
    leaf = max(range(len(parent)), key=lambda i: (_depth(parent, i), -i))
    path = []
    while leaf > 0:
        path.append(leaf)
        leaf = parent[leaf]
    path = path[::-1]
    greedy = _greedy(model, prompt, len(path))[len(prompt):]
    for node, tok in zip(path, greedy, strict=True):
        tokens[node] = tok
        for sib in np.nonzero(parent == parent[node])[0]:
            if sib != node and tokens[sib] == tok:
                used = {int(tokens[s]) for s in np.nonzero(parent == parent[node])[0]}
                tokens[sib] = min(set(range(CFG.vocab_size)) - used)


def _depth(parent, i):
    d = 0
    while parent[i] >= 0:
        i, d = parent[i], d + 1
    return d


def test_tree_verify_commit_then_decode_equals_full_forward():
    model = init_random(CFG, seed=7)
    b, n, prefix = 3, 10, 5
    prompts = rng_tokens((b, prefix), CFG.vocab_size, seed=1)
    cache = KVCache.zeros(CFG, b, 32)
    pos = jnp.broadcast_to(jnp.arange(prefix - 1), (b, prefix - 1))
    # Cache all but the last prompt token, which becomes the tree's root.
    _, _, _, cache = fwd(*model, jnp.asarray(prompts[:, :-1]), pos,
                         causal_mask(jnp.full((b,), prefix - 1), prefix - 1), cache)
    cache_len = jnp.full((b,), prefix - 1, jnp.int32)
    tree = random_tree(np.random.RandomState(3), b, n, CFG.vocab_size)
    tokens = np.asarray(tree.tokens).copy()
    tokens[:, 0] = prompts[:, -1]
    for r in range(b):  # put the target's greedy continuation along the deepest path
        _plant_greedy_path(model, prompts[r], tokens[r], np.asarray(tree.parent[r]))
    tree = tree.replace(tokens=jnp.asarray(tokens))
    logits, _, _, block = fwd(*model, tree.tokens, cache_len[:, None] + tree.depth,
                              ancestor_mask(tree.parent), cache, cache_len, write=False)
    # Tree verification gives each node the logits a plain forward over its path would.
    for r in range(b):
        for i in range(n + 1):
            path, j = [], i
            while j >= 0:
                path.append(int(tree.tokens[r, j]))
                j = int(tree.parent[r, j])
            seq = np.concatenate([prompts[r, :-1], path[::-1]])[None]
            ref, *_ = fwd(*model, jnp.asarray(seq), jnp.arange(seq.shape[1])[None],
                          causal_mask(jnp.array([seq.shape[1]]), seq.shape[1]))
            np.testing.assert_allclose(np.asarray(logits[r, i]), np.asarray(ref[0, -1]),
                                       rtol=1e-5, atol=1e-5)
    path, count, bonus = greedy_accept(tree, jnp.argmax(logits, -1).astype(jnp.int32), n)
    cache = commit_path(cache, block, cache_len, path)
    new_len = cache_len + 1 + count  # root plus accepted nodes
    step_logits, *_ = fwd(*model, bonus[:, None], new_len[:, None], jnp.ones((b, 1, 1), bool),
                          cache, new_len)
    assert int(count.min()) >= 2  # the planted paths were accepted, so entries really moved
    for r in range(b):
        accepted = [int(tree.tokens[r, s]) for s in np.asarray(path[r]) if s >= 0]
        seq = np.concatenate([prompts[r, :-1], accepted, [int(bonus[r])]])[None]
        ref, *_ = fwd(*model, jnp.asarray(seq), jnp.arange(seq.shape[1])[None],
                      causal_mask(jnp.array([seq.shape[1]]), seq.shape[1]))
        np.testing.assert_allclose(np.asarray(step_logits[r, 0]), np.asarray(ref[0, -1]),
                                   rtol=1e-5, atol=1e-5)

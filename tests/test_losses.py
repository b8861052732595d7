"""Draft losses against references written with loops: each chain and each tree branch is run
the way the engine drafts it (one row at a time against a KV cache)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from spec_models import tiny_cfg
from test_tree_accept import random_tree

from aurora_jax.learn.losses import LearnBatch, LossConfig, draft_loss
from aurora_jax.models.eagle3 import DraftConfig
from aurora_jax.models.eagle3_io import init_draft
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.transformer import init_random

CFG = tiny_cfg(hidden=32)
B, T, S, N = 2, 8, 2, 5
LENGTHS = [8, 6]


@pytest.fixture(scope="module")
def setup():
    target = nnx.merge(*init_random(CFG, seed=1))
    ids = np.sort(np.random.RandomState(0).choice(CFG.vocab_size, 30, replace=False))
    draft = init_draft(DraftConfig.for_target(CFG, draft_vocab_size=30), seed=2,
                       draft_to_target=ids)
    rs = np.random.RandomState(3)
    tree = random_tree(rs, B * S, N, CFG.vocab_size, topk=2)
    parent = np.asarray(tree.parent)
    accepted = np.zeros((B * S, N + 1), bool)
    for i in range(B * S):  # the accepted path: a random node and its ancestors
        j = rs.randint(N + 1)
        while j >= 0:
            accepted[i, j], j = True, parent[i, j]
    batch = LearnBatch(
        tokens=jnp.asarray(rs.randint(3, CFG.vocab_size, (B, T)), jnp.int32),
        aux=jnp.asarray(rs.randn(B, T, 3, CFG.hidden_size), jnp.float32),
        target_hidden=jnp.asarray(rs.randn(B, T, CFG.hidden_size) * 3, jnp.float32),
        length=jnp.array(LENGTHS, jnp.int32),
        tree_tokens=tree.tokens.reshape(B, S, N + 1),
        tree_parent=tree.parent.reshape(B, S, N + 1),
        tree_hidden=jnp.asarray(rs.randn(B, S, N + 1, CFG.hidden_size) * 3, jnp.float32),
        tree_accepted=jnp.asarray(accepted.reshape(B, S, N + 1)),
        tree_root_pos=jnp.array([[3, 6], [1, 4]], jnp.int32),
        tree_valid=jnp.array([[True, True], [True, False]]))
    return target, draft, batch


def _loss(target, draft, batch, cfg):
    d = nnx.merge(draft.graphdef, draft.state)
    return draft_loss(d, target.embed[...], target.logits, batch, cfg)


@jax.jit
def _row(graphdef, state, embed_1xH, hidden_1xH, pos, cache, cache_len):
    """One draft row at `pos` against a cache holding `cache_len` rows (serving style)."""
    d = nnx.merge(graphdef, state)
    logits, h, cache = d(embed_1xH[None, None], hidden_1xH[None, None], pos[None, None],
                         jnp.ones((1, 1, 1), bool), cache, cache_len[None])
    return logits[0, 0], h[0, 0], cache


def _kl_term(target, d, logits_q, target_h):
    """(KL over the draft vocab, or None when the target argmax is outside it)."""
    p = np.asarray(jax.nn.softmax(target.logits(target_h)))
    ids = np.arange(d.cfg.draft_vocab_size) + np.asarray(d.d2t[...])
    if not np.asarray(d.t2d[...])[p.argmax()]:
        return None
    pd = p[ids] / p[ids].sum()
    logq = np.asarray(jax.nn.log_softmax(logits_q))
    return float(np.sum(np.where(pd > 0, pd * (np.log(np.maximum(pd, 1e-30)) - logq), 0.0)))


def _reference(target, draft, batch, cfg: LossConfig):
    d = nnx.merge(draft.graphdef, draft.state)
    embed = target.embed[...]
    tok, aux, th = (np.asarray(x) for x in (batch.tokens, batch.aux, batch.target_hidden))
    feats = np.asarray(d.project(jnp.asarray(aux)))

    def prefix_cache(b, rows):
        """Cache with committed rows 0..rows-1 (step 1), run one at a time."""
        cache = KVCache.zeros(d.cfg, 1, 32, jnp.float32, num_layers=1)
        outs = []
        for j in range(rows):
            _, h, cache = _row(draft.graphdef, draft.state, embed[tok[b, j + 1]],
                               jnp.asarray(feats[b, j]), jnp.int32(j), cache, jnp.int32(j))
            outs.append(h)
        return cache, outs

    per_step = [[] for _ in range(cfg.ttt_steps)]
    for b in range(B):
        n = LENGTHS[b]
        for j in range(n - 1):
            cache, _ = prefix_cache(b, j)
            hidden, clen = jnp.asarray(feats[b, j]), j
            for k in range(1, cfg.ttt_steps + 1):
                if j + k >= n:
                    break
                logits, hidden, cache = _row(draft.graphdef, draft.state, embed[tok[b, j + k]],
                                             hidden, jnp.int32(j + k - 1), cache, jnp.int32(clen))
                clen += 1
                term = _kl_term(target, d, logits, jnp.asarray(th[b, j + k]))
                if term is not None:
                    per_step[k - 1].append(term)
    ttt = sum(cfg.step_weight ** k * np.mean(v) for k, v in enumerate(per_step) if v)

    discard = []
    tt, tp = np.asarray(batch.tree_tokens), np.asarray(batch.tree_parent)
    acc, th_tree = np.asarray(batch.tree_accepted), np.asarray(batch.tree_hidden)
    for b in range(B):
        for s in range(S):
            if not batch.tree_valid[b, s]:
                continue
            c = int(batch.tree_root_pos[b, s])
            cache, outs = prefix_cache(b, c)  # rows 0..c-1; row c-1 is the root's
            for i in range(1, N + 1):
                if acc[b, s, i]:
                    continue
                path, j = [], i
                while j > 0:
                    path.append(j)
                    j = tp[b, s, j]
                hidden, cc, clen = outs[c - 1], cache, c
                for depth, node in enumerate(path[::-1], start=1):
                    logits, hidden, cc = _row(draft.graphdef, draft.state, embed[tt[b, s, node]],
                                              hidden, jnp.int32(c - 1 + depth), cc,
                                              jnp.int32(clen))
                    clen += 1
                term = _kl_term(target, d, logits, jnp.asarray(th_tree[b, s, i]))
                if term is not None:
                    discard.append(term)
    return ttt, float(np.mean(discard))


def test_losses_match_loop_reference(setup):
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=0.7, tree_depth=N)
    loss, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    ttt, discard = _reference(target, draft, batch, cfg)
    np.testing.assert_allclose(float(metrics["ttt_loss"]), ttt, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["discard_loss"]), discard, rtol=1e-4)
    np.testing.assert_allclose(float(loss), ttt + 0.7 * discard, rtol=1e-4)
    assert 0 < float(metrics["out_of_vocab"]) < 1  # the reduced vocabulary was exercised


def test_lambda_zero_is_the_plain_eagle3_loss(setup):
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=0.0)
    loss, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    assert "discard_loss" not in metrics
    with_discard = dataclasses.replace(cfg, lambda_discard=1.0)
    full, _ = jax.jit(lambda b: _loss(target, draft, b, with_discard))(batch)
    np.testing.assert_allclose(float(loss), float(metrics["ttt_loss"]), rtol=1e-6)
    assert float(full) > float(loss)


def test_discard_gradient_comes_only_from_rejected_nodes(setup):
    """The discard term depends on the target's distribution at rejected nodes only."""
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=2, lambda_discard=1.0, tree_depth=N)

    def discard(tree_hidden):
        return _loss(target, draft, batch.replace(tree_hidden=tree_hidden), cfg)[1][
            "discard_loss"]

    g = np.abs(np.asarray(jax.jit(jax.grad(discard))(batch.tree_hidden))).sum(-1)  # [B,S,N+1]
    rejected = (np.asarray(batch.tree_valid)[..., None] & ~np.asarray(batch.tree_accepted))
    rejected[..., 0] = False
    assert np.all(g[~rejected] == 0)
    assert np.mean(g[rejected] > 0) > 0.5  # out-of-vocab argmax nodes are left out

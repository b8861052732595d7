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

from aurora_jax.errors import ConfigError
from aurora_jax.learn.losses import LearnBatch, LossConfig, draft_loss, ttt_loss
from aurora_jax.models.eagle3 import DraftConfig, init_draft
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
    tokens = rs.randint(3, CFG.vocab_size, (B, T)).astype(np.int32)
    root_pos = np.array([[3, 6], [1, 4]], np.int32)
    # As in served traces, the root and the accepted path are the committed tokens at their
    # positions (where those lie inside the window).
    tree_tokens = np.asarray(tree.tokens).reshape(B, S, N + 1).copy()
    depth = np.asarray(tree.depth).reshape(B, S, N + 1)
    acc = accepted.reshape(B, S, N + 1)
    for b in range(B):
        for s in range(S):
            for i in range(N + 1):
                if acc[b, s, i] and root_pos[b, s] + depth[b, s, i] < T:
                    tree_tokens[b, s, i] = tokens[b, root_pos[b, s] + depth[b, s, i]]
    batch = LearnBatch(
        tokens=jnp.asarray(tokens),
        aux=jnp.asarray(rs.randn(B, T, 3, CFG.hidden_size), jnp.float32),
        target_hidden=jnp.asarray(rs.randn(B, T, CFG.hidden_size) * 3, jnp.float32),
        length=jnp.array(LENGTHS, jnp.int32),
        tree_tokens=jnp.asarray(tree_tokens),
        tree_parent=tree.parent.reshape(B, S, N + 1),
        tree_hidden=jnp.asarray(rs.randn(B, S, N + 1, CFG.hidden_size) * 3, jnp.float32),
        tree_accepted=jnp.asarray(acc),
        tree_root_pos=jnp.asarray(root_pos),
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


def _tv_term(target, d, logits_q, target_h):
    """Total variation by hand: 1 - sum over the draft vocabulary of min(p, q), with p the
    full target distribution (not renormalised) and q the draft's, in float64."""
    p = np.asarray(jax.nn.softmax(target.logits(target_h)), np.float64)
    q = np.asarray(jax.nn.softmax(logits_q), np.float64)
    ids = np.arange(d.cfg.draft_vocab_size) + np.asarray(d.d2t[...])
    return 1.0 - float(np.sum(np.minimum(p[ids], q)))


def _reference(target, draft, batch, cfg: LossConfig):
    """(TTT term, one record per rejected node: depth, whether it is a frontier node, the
    draft's logits at the node and at its parent, its token, the target hidden at the node
    and at its parent), all run row by row against a KV cache as the engine drafts."""
    d = nnx.merge(draft.graphdef, draft.state)
    embed = target.embed[...]
    tok, aux, th = (np.asarray(x) for x in (batch.tokens, batch.aux, batch.target_hidden))
    feats = np.asarray(d.project(jnp.asarray(aux)))

    def prefix_cache(b, rows):
        """Cache with committed rows 0..rows-1 (step 1), run one at a time."""
        cache = KVCache.zeros(d.cfg, 1, 32, jnp.float32, num_layers=1)
        outs = []
        for j in range(rows):
            logits, h, cache = _row(draft.graphdef, draft.state, embed[tok[b, j + 1]],
                                    jnp.asarray(feats[b, j]), jnp.int32(j), cache, jnp.int32(j))
            outs.append((logits, h))
        return cache, outs

    per_step = [[] for _ in range(cfg.ttt_steps)]
    tv_step = [[] for _ in range(cfg.ttt_steps)]  # every row, in vocabulary or not
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
                tv_step[k - 1].append(_tv_term(target, d, logits, jnp.asarray(th[b, j + k])))
    ttt = sum(cfg.step_weight ** k * ((np.mean(v) if v else 0.0)
                                      + cfg.tv_weight * (np.mean(tv) if tv else 0.0))
              for k, (v, tv) in enumerate(zip(per_step, tv_step, strict=True)))

    nodes = []
    tt, tp = np.asarray(batch.tree_tokens), np.asarray(batch.tree_parent)
    acc, th_tree = np.asarray(batch.tree_accepted), np.asarray(batch.tree_hidden)
    for b in range(B):
        for s in range(S):
            if not batch.tree_valid[b, s]:
                continue
            c = int(batch.tree_root_pos[b, s])
            cache, outs = prefix_cache(b, c)  # rows 0..c-1; row c-1 is the root's
            for i in range(1, tt.shape[2]):
                if acc[b, s, i]:
                    continue
                path, j = [], i
                while j > 0:
                    path.append(j)
                    j = tp[b, s, j]
                (logits, hidden), cc, clen = outs[c - 1], cache, c
                for depth, node in enumerate(path[::-1], start=1):
                    parent_logits = logits
                    logits, hidden, cc = _row(draft.graphdef, draft.state, embed[tt[b, s, node]],
                                              hidden, jnp.int32(c - 1 + depth), cc,
                                              jnp.int32(clen))
                    clen += 1
                p = tp[b, s, i]
                nodes.append(dict(
                    depth=len(path), token=int(tt[b, s, i]),
                    frontier=bool(acc[b, s, p]) and c + len(path) - 1 < LENGTHS[b],
                    logits=logits, parent_logits=parent_logits,
                    hidden=jnp.asarray(th_tree[b, s, i]),
                    parent_hidden=jnp.asarray(th_tree[b, s, p])))
    return ttt, nodes


def _node_loss(target, d, node, objective):
    ids = np.arange(d.cfg.draft_vocab_size) + np.asarray(d.d2t[...])
    if objective == "kl":
        return _kl_term(target, d, node["logits"], node["hidden"]) or 0.0
    if objective == "tv":
        p = np.asarray(jax.nn.softmax(target.logits(node["hidden"])))
        return 1.0 - float(np.sum(np.minimum(p[ids], np.asarray(jax.nn.softmax(node["logits"])))))
    q = np.asarray(jax.nn.softmax(node["parent_logits"]))
    p = np.asarray(jax.nn.softmax(target.logits(node["parent_hidden"])))
    where = np.flatnonzero(ids == node["token"])
    if not where.size or q[where[0]] <= p[node["token"]]:
        return 0.0
    return -float(np.log(1.0 - q[where[0]]))


def _reference_discard(target, draft, nodes, cfg: LossConfig):
    """The rejected-node term from the loop records, for any objective / nodes / weight."""
    d = nnx.merge(draft.graphdef, draft.state)
    ids = list(np.arange(d.cfg.draft_vocab_size) + np.asarray(d.d2t[...]))
    if cfg.discard_nodes == "frontier":
        nodes = [x for x in nodes if x["frontier"] and x["depth"] <= cfg.ttt_steps]
    else:
        nodes = [x for x in nodes if x["depth"] <= cfg.tree_depth]
    losses = np.array([_node_loss(target, d, x, cfg.discard) for x in nodes])
    if cfg.discard_weight == "depth":
        w = np.array([cfg.step_weight ** (x["depth"] - 1) for x in nodes])
    elif cfg.discard_weight == "draft_prob":
        w = np.array([float(jax.nn.softmax(x["parent_logits"])[ids.index(x["token"])])
                      if x["token"] in ids else 0.0 for x in nodes])
    else:
        w = np.ones(len(nodes))
    return float(np.sum(w / w.mean() * losses) / len(nodes))


@pytest.fixture(scope="module")
def reference(setup):
    target, draft, batch = setup
    return _reference(target, draft, batch, LossConfig(ttt_steps=3))


def test_losses_match_loop_reference(setup, reference):
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=0.7, tree_depth=N, discard="kl",
                     discard_nodes="all")
    loss, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    ttt, nodes = reference
    discard = _reference_discard(target, draft, nodes, cfg)
    np.testing.assert_allclose(float(metrics["ttt_loss"]), ttt, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["discard_loss"]), discard, rtol=1e-4)
    np.testing.assert_allclose(float(loss), ttt + 0.7 * discard, rtol=1e-4)
    assert 0 < float(metrics["out_of_vocab"]) < 1  # the reduced vocabulary was exercised
    assert float(metrics["rejected_nodes"]) == len(nodes)


@pytest.mark.parametrize("objective,nodes,weight", [
    ("kl", "frontier", "uniform"), ("tv", "all", "uniform"), ("tv", "frontier", "depth"),
    ("unlikelihood", "all", "uniform"), ("unlikelihood", "frontier", "uniform"),
    ("kl", "all", "depth"), ("kl", "all", "draft_prob"), ("unlikelihood", "all", "draft_prob")])
def test_discard_variants_match_loop_reference(setup, reference, objective, nodes, weight):
    """Each objective, node set and weighting equals the loop reference (frontier nodes come
    from the TTT unroll's work in the library, from a separate branch run in the loop)."""
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=1.0, tree_depth=N, discard=objective,
                     discard_nodes=nodes, discard_weight=weight)
    _, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    want = _reference_discard(target, draft, reference[1], cfg)
    assert want > 0
    np.testing.assert_allclose(float(metrics["discard_loss"]), want, rtol=1e-4)


def test_frontier_nodes_are_exercised(reference):
    """The fixture has frontier nodes at several depths and non-frontier rejected nodes."""
    depths = {x["depth"] for x in reference[1] if x["frontier"]}
    assert len(depths) >= 2 and any(not x["frontier"] for x in reference[1])


def test_tv_of_one_token_chain_is_one_minus_acceptance_probability(setup):
    """One drafted token, rejected: the TV term equals 1 - P(speculative sampling accepts),
    with P = sum_x q(x) min(1, p(x) / q(x)) enumerated over the draft's tokens."""
    target, draft, batch = setup
    one = batch.replace(
        tree_tokens=batch.tree_tokens[:, :, :2], tree_parent=batch.tree_parent[:, :, :2],
        tree_hidden=batch.tree_hidden[:, :, :2],
        tree_accepted=jnp.zeros((B, S, 2), bool).at[:, :, 0].set(True),
        tree_valid=jnp.array([[True, False], [False, False]]))
    cfg = LossConfig(ttt_steps=1, lambda_discard=1.0, tree_depth=1, discard="tv")
    _, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(one)
    # The brute force: the draft's distribution after the drafted token, the target's there.
    _, nodes = _reference(target, draft, one, cfg)
    d = nnx.merge(draft.graphdef, draft.state)
    q = np.asarray(jax.nn.softmax(nodes[0]["logits"]), np.float64)
    p = np.asarray(jax.nn.softmax(target.logits(nodes[0]["hidden"])), np.float64)
    ids = np.arange(d.cfg.draft_vocab_size) + np.asarray(d.d2t[...])
    accept = sum(q[i] * min(1.0, p[ids[i]] / q[i]) for i in range(len(ids)))
    assert len(nodes) == 1
    np.testing.assert_allclose(float(metrics["discard_loss"]), 1.0 - accept, rtol=1e-5)


@pytest.mark.parametrize("objective", ["kl", "tv", "unlikelihood"])
def test_negative_term_is_zero_at_accepted_nodes_and_the_root(setup, objective):
    """Per-node losses and their gradients vanish at accepted nodes and at the root; a batch
    whose every node was accepted gives a zero term and a zero gradient."""
    from aurora_jax.learn.discard import node_losses, tree_geometry

    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=1.0, tree_depth=N, discard=objective,
                     discard_nodes="all")
    accepted = np.asarray(batch.tree_accepted) | (np.arange(N + 1) == 0)

    graphdef, params, rest = nnx.split(nnx.merge(draft.graphdef, draft.state), nnx.Param, ...)

    def per_node(params, b):
        d = nnx.merge(graphdef, params, rest)
        _, _, work = ttt_loss(d, target.embed[...], target.logits, b, cfg)
        trees = tree_geometry(b, T - 1, cfg)
        return node_losses(d, target.embed[...], target.logits, trees, work, cfg)[0]

    on_accepted = lambda p: jnp.sum(jnp.where(accepted, per_node(p, batch), 0.0))  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(on_accepted))(params)
    assert float(value) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert float(jnp.abs(per_node(params, batch)).sum()) > 0

    all_accepted = batch.replace(tree_accepted=jnp.ones_like(batch.tree_accepted))
    term = lambda p: draft_loss(nnx.merge(graphdef, p, rest), target.embed[...],  # noqa: E731
                                target.logits, all_accepted, cfg)[1]["discard_loss"]
    value, grads = jax.jit(jax.value_and_grad(term))(params)
    assert float(value) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("weight", ["uniform", "depth"])
def test_subsampled_discard_term_is_unbiased(setup, weight):
    """With one tree per sequence drawn at random and inverse-probability weights, the mean
    over many draws equals the full term (within 4 standard errors of the draws' mean)."""
    target, draft, batch = setup
    full_cfg = LossConfig(ttt_steps=2, lambda_discard=1.0, tree_depth=N, discard="kl",
                          discard_nodes="all", discard_weight=weight)
    sub_cfg = dataclasses.replace(full_cfg, discard_trees=1)
    d = nnx.merge(draft.graphdef, draft.state)
    full = float(draft_loss(d, target.embed[...], target.logits, batch, full_cfg)[1][
        "discard_loss"])
    sub = jax.jit(jax.vmap(lambda step: draft_loss(
        nnx.merge(draft.graphdef, draft.state), target.embed[...], target.logits, batch,
        sub_cfg, step)[1]["discard_loss"]))(jnp.arange(400))
    sub = np.asarray(sub)
    assert sub.std() > 0  # the draws differ: the estimate is really sampled
    assert abs(sub.mean() - full) < 4 * sub.std() / np.sqrt(len(sub))


def test_discard_warmup_ramps_lambda(setup):
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=2, lambda_discard=0.8, discard_warmup=4, tree_depth=N,
                     discard="kl", discard_nodes="all")
    d = nnx.merge(draft.graphdef, draft.state)
    lam = [float(draft_loss(d, target.embed[...], target.logits, batch, cfg, step)[1][
        "discard_lambda"]) for step in (0, 1, 3, 10)]
    np.testing.assert_allclose(lam, [0.2, 0.4, 0.8, 0.8], rtol=1e-6)


def test_loss_config_refuses_unknown_variants():
    with pytest.raises(ConfigError, match="discard must be one of"):
        LossConfig(discard="hinge")
    with pytest.raises(ConfigError, match="discard_nodes"):
        LossConfig(discard_nodes="some")


def test_lambda_zero_is_the_plain_eagle3_loss(setup, reference):
    """With lambda_discard = 0 the whole loss is the TTT term, and that term equals the loop
    reference's (each chain unrolled row by row against a KV cache)."""
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, lambda_discard=0.0, discard="kl", discard_nodes="all")
    loss, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    assert "discard_loss" not in metrics
    with_discard = dataclasses.replace(cfg, lambda_discard=1.0)
    full, _ = jax.jit(lambda b: _loss(target, draft, b, with_discard))(batch)
    np.testing.assert_allclose(float(loss), float(metrics["ttt_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss), reference[0], rtol=1e-4)
    assert float(full) > float(loss)


def test_total_variation_is_one_minus_the_overlap_by_hand():
    """TV on a case worked by hand: target p over 5 tokens, a draft vocabulary of target ids
    {1, 3, 4} with q = (0.5, 0.2, 0.3): overlap min(.4,.5) + min(.3,.2) + min(0,.3) = 0.6,
    so TV = 0.4 (the target's mass outside the draft vocabulary counts as disagreement)."""
    from aurora_jax.learn.divergence import total_variation

    p = jnp.array([0.1, 0.4, 0.2, 0.3, 0.0])
    d2t = jnp.array([1, 2, 2])  # draft id i is target id i + d2t[i]: 1, 3, 4
    q = jnp.array([0.5, 0.2, 0.3])
    np.testing.assert_allclose(float(total_variation(p, q, d2t)), 0.4, rtol=1e-5)
    np.testing.assert_allclose(float(total_variation(p, p[jnp.array([1, 3, 4])], d2t)),
                               0.3, rtol=1e-5)  # q = p on the vocabulary: the mass outside


def test_tv_weight_adds_the_total_variation_of_every_ttt_step(setup):
    """tv_weight > 0 adds, at each TTT step with its step weight, the mean over the committed
    rows of 1 - sum min(p, q) computed by hand from the loop reference's draft logits."""
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=3, tv_weight=0.5)
    loss, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    want, _ = _reference(target, draft, batch, cfg)
    plain, _ = _reference(target, draft, batch, dataclasses.replace(cfg, tv_weight=0.0))
    assert want - plain > 0.05  # the TV term is really there
    np.testing.assert_allclose(float(metrics["ttt_loss"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_nodes_deeper_than_tree_depth_are_left_out(setup, reference):
    """The all-nodes term reaches nodes down to `tree_depth` (one draft pass per depth): on
    trees deeper than that, the deeper rejected nodes are neither counted nor averaged over,
    and the term over the rest equals the loop reference."""
    target, draft, batch = setup
    nodes = reference[1]
    cfg = LossConfig(ttt_steps=3, lambda_discard=1.0, tree_depth=2, discard="kl",
                     discard_nodes="all")
    assert any(x["depth"] > cfg.tree_depth for x in nodes)  # the cut matters
    _, metrics = jax.jit(lambda b: _loss(target, draft, b, cfg))(batch)
    assert float(metrics["rejected_nodes"]) == sum(x["depth"] <= 2 for x in nodes)
    np.testing.assert_allclose(float(metrics["discard_loss"]),
                               _reference_discard(target, draft, nodes, cfg), rtol=1e-4)


def test_discard_gradient_comes_only_from_rejected_nodes(setup):
    """The discard term depends on the target's distribution at rejected nodes only."""
    target, draft, batch = setup
    cfg = LossConfig(ttt_steps=2, lambda_discard=1.0, tree_depth=N, discard="kl",
                     discard_nodes="all")

    def discard(tree_hidden):
        return _loss(target, draft, batch.replace(tree_hidden=tree_hidden), cfg)[1][
            "discard_loss"]

    g = np.abs(np.asarray(jax.jit(jax.grad(discard))(batch.tree_hidden))).sum(-1)  # [B,S,N+1]
    rejected = (np.asarray(batch.tree_valid)[..., None] & ~np.asarray(batch.tree_accepted))
    rejected[..., 0] = False
    assert np.all(g[~rejected] == 0)
    assert np.mean(g[rejected] > 0) > 0.5  # out-of-vocab argmax nodes are left out

"""EAGLE-2 tree proposal against a loop reference that runs the draft on each node's path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from spec_models import random_pair, tiny_cfg

from aurora_jax.models.attention import causal_mask
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.speculative.draft import catch_up, propose


def _setup(draft_scale=1.0, seed=0):
    target, draft = random_pair(tiny_cfg(), seed=seed)
    model = nnx.merge(target.graphdef, target.state)
    d = nnx.merge(draft.graphdef, draft.state)
    if draft_scale != 1.0:
        d.lm_head.kernel.set_value(d.lm_head.kernel[...] * draft_scale)
    b, r = 2, 6
    rs = np.random.RandomState(seed)
    tokens = jnp.asarray(rs.randint(3, 40, (b, r)), jnp.int32)
    aux = jnp.asarray(rs.randn(b, r, 3, 64), jnp.float32)
    count = jnp.array([6, 4], jnp.int32)
    cache = KVCache.zeros(d.cfg, b, 32, jnp.float32, num_layers=1)
    lp, h, cache, dlen = catch_up(d, model.embed[...], cache, jnp.zeros((b,), jnp.int32), tokens,
                                  aux, count)
    return model.embed[...], d, cache, dlen, tokens[jnp.arange(b), count - 1], lp, h


def _reference(embed, d, cache, dlen, root_lp, root_h, spec: SpecConfig, row: int):
    """{token path (target ids): (draft log-prob of the last token, cumulative score)} of the
    tree EAGLE-2 keeps, computed node by node: each expanded node runs the draft on its whole
    path (a causal block over the cached prefix)."""
    k = spec.width
    c1 = jax.tree.map(lambda x: x[row: row + 1], cache)
    n = dlen[row: row + 1]
    to_t = lambda ids: [int(d.to_target_ids(jnp.int32(i))) for i in ids]  # noqa: E731

    def children(lp):
        order = np.argsort(-np.asarray(lp), kind="stable")[:k]
        return [(int(i), float(lp[i])) for i in order]

    nodes = {}  # path of draft ids -> (lp, score, hidden out of the step that produced it)
    level = []
    for tok, lp in children(root_lp[row]):
        nodes[(tok,)] = (lp, lp)
        level.append((tok,))
    hidden_in = {(): root_h[row]}  # output hidden of a path's last node = input of its children
    for _ in range(2, spec.depth + 1):
        beam = sorted(level, key=lambda p: -nodes[p][1])[:k]
        level = []
        for path in beam:
            rows = len(path)
            embeds = embed[jnp.asarray([to_t(path)])]
            hiddens = jnp.stack([hidden_in[path[:i]] for i in range(rows)])[None]
            logits, h = _path_step(*nnx.split(d), embeds, hiddens, c1, n)
            hidden_in[path] = h[0, -1]
            for tok, lp in children(jax.nn.log_softmax(logits[0, -1])):
                nodes[path + (tok,)] = (lp, nodes[path][1] + lp)
                level.append(path + (tok,))
    kept = sorted(nodes, key=lambda p: -nodes[p][1])[: spec.nodes]
    return {tuple(to_t(p)): nodes[p][0] for p in kept}


@jax.jit
def _path_step(graphdef, state, embeds, hiddens, cache, n):
    rows = embeds.shape[1]
    logits, h, _ = nnx.merge(graphdef, state)(embeds, hiddens, n[:, None] + jnp.arange(rows)[None],
                                              causal_mask(jnp.array([rows]), rows), cache, n)
    return logits, h


def _propose(d, *args, spec):
    fn = jax.jit(lambda g, s, *a: propose(nnx.merge(g, s), *a, spec=spec))
    return fn(*nnx.split(d), *args)


@pytest.mark.parametrize("spec", [SpecConfig(mode="tree", depth=4, topk=3, num_draft_tokens=10),
                                  SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=6),
                                  SpecConfig(mode="chain", depth=5)])
def test_propose_matches_node_by_node_reference(spec):
    embed, d, cache, dlen, root, lp, h = _setup()
    tree, draft_logp = _propose(d, embed, cache, dlen, root, lp, h, spec=spec)
    tokens, parent = np.asarray(tree.tokens), np.asarray(tree.parent)
    depth = np.asarray(tree.depth)
    for row in range(2):
        got = {}
        for i in range(1, spec.nodes + 1):
            assert 0 <= parent[row, i] < i and depth[row, i] == depth[row, parent[row, i]] + 1
            path, j = [], i
            while j > 0:
                path.append(int(tokens[row, j]))
                j = parent[row, j]
            got[tuple(path[::-1])] = float(draft_logp[row, i])
        want = _reference(embed, d, cache, dlen, lp, h, spec, row)
        assert got.keys() == want.keys()
        for p in want:
            assert got[p] == pytest.approx(want[p], abs=1e-4)


def test_ties_keep_parents_before_children():
    """A confident draft gives log-prob 0 along its argmax chain, so a node and its child tie;
    the kept set must still be a tree (the shallower node wins the tie)."""
    embed, d, cache, dlen, root, lp, h = _setup(draft_scale=1e5)
    spec = SpecConfig(mode="tree", depth=4, topk=2, num_draft_tokens=3)
    tree, draft_logp = _propose(d, embed, cache, dlen, root, lp, h, spec=spec)
    assert np.all(np.asarray(draft_logp)[:, 1:] == 0.0)  # the tie is real
    np.testing.assert_array_equal(np.asarray(tree.parent), [[-1, 0, 1, 2]] * 2)
    np.testing.assert_array_equal(np.asarray(tree.depth), [[0, 1, 2, 3]] * 2)

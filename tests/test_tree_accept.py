"""Tree masks and acceptance rules against loop references; sampling is lossless."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.speculative.accept import greedy_accept, sample_accept
from aurora_jax.speculative.tree import Tree, ancestor_mask, chain


def random_tree(rs, b, n, vocab, topk=3):
    """Random trees whose parents precede their children, at most `topk` children each."""
    parent = np.full((b, n + 1), -1, np.int32)
    depth = np.zeros((b, n + 1), np.int32)
    tokens = rs.randint(0, vocab, (b, n + 1)).astype(np.int32)
    for r in range(b):
        kids = {0: set()}
        for i in range(1, n + 1):
            options = [j for j in range(i) if len(kids[j]) < topk]
            p = options[rs.randint(len(options))]
            # siblings carry distinct tokens, as top-k children do
            while tokens[r, i] in {tokens[r, s] for s in kids[p]}:
                tokens[r, i] = rs.randint(vocab)
            parent[r, i], depth[r, i] = p, depth[r, p] + 1
            kids[p].add(i)
            kids[i] = set()
    return Tree(jnp.asarray(tokens), jnp.asarray(parent), jnp.asarray(depth),
                jnp.ones((b, n + 1), bool))


@pytest.mark.parametrize("n", [1, 5, 16, 33])
def test_ancestor_mask_matches_loop(n):
    rs = np.random.RandomState(n)
    tree = random_tree(rs, 3, n, 50)
    got = np.asarray(ancestor_mask(tree.parent))
    parent = np.asarray(tree.parent)
    for r in range(3):
        for i in range(n + 1):
            seen, j = set(), i
            while j >= 0:
                seen.add(j)
                j = parent[r, j]
            assert set(np.nonzero(got[r, i])[0]) == seen


def _greedy_reference(tokens, parent, argmax):
    cur, path = 0, [0]
    while True:
        kids = [i for i in range(len(tokens)) if parent[i] == cur and tokens[i] == argmax[cur]]
        if not kids:
            return path, argmax[cur]
        cur = kids[0]
        path.append(cur)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_accept_matches_reference(seed):
    rs = np.random.RandomState(seed)
    n, vocab = 12, 4  # a small vocabulary makes long accepted paths likely
    tree = random_tree(rs, 6, n, vocab)
    argmax = rs.randint(0, vocab, (6, n + 1)).astype(np.int32)
    path, count, bonus = greedy_accept(tree, jnp.asarray(argmax), max_depth=n)
    lengths = []
    for r in range(6):
        ref_path, ref_bonus = _greedy_reference(np.asarray(tree.tokens[r]),
                                                np.asarray(tree.parent[r]), argmax[r])
        got = [int(x) for x in np.asarray(path[r]) if x >= 0]
        assert got == ref_path and int(bonus[r]) == ref_bonus
        assert int(count[r]) == len(ref_path) - 1
        lengths.append(len(ref_path))
    assert max(lengths) > 2  # the test exercised multi-token acceptance


def test_chain_that_copies_the_target_is_fully_accepted():
    target_next = np.array([[5, 6, 7, 8, 9]])  # argmax at root, node1, ... node4
    tree = chain(jnp.array([4]), jnp.asarray(target_next[:, :4]))
    path, count, bonus = greedy_accept(tree, jnp.asarray(target_next), max_depth=4)
    assert np.asarray(path).tolist() == [[0, 1, 2, 3, 4]]
    assert int(count[0]) == 4 and int(bonus[0]) == 9


def test_speculative_sampling_is_lossless():
    """The first emitted token follows p(root); the second, given the first was child x,
    follows p(x): whatever tokens the tree proposed."""
    vocab = 5
    # root -> children {2, 0, 4} (slots 1..3); slot 1 -> child {1} (slot 4)
    tree = Tree(tokens=jnp.array([[3, 2, 0, 4, 1]]), parent=jnp.array([[-1, 0, 0, 0, 1]]),
                depth=jnp.array([[0, 1, 1, 1, 2]]), valid=jnp.ones((1, 5), bool))
    rs = np.random.RandomState(0)
    probs = rs.dirichlet(np.ones(vocab), size=(1, 5)).astype(np.float32)
    n = 60000
    keys = jax.random.split(jax.random.key(1), n)
    run = jax.jit(jax.vmap(lambda k: sample_accept(k[None], tree, jnp.asarray(probs), max_depth=2)))
    path, count, bonus = (np.asarray(x)[:, 0] for x in run(keys))  # batch of one
    toks = np.asarray(tree.tokens[0])
    first = np.where(count >= 1, toks[path[:, 1].clip(0)], bonus)
    freq = np.bincount(first, minlength=vocab) / n
    tol = 5 * np.sqrt(probs[0, 0] * (1 - probs[0, 0]) / n) + 1e-9
    np.testing.assert_array_less(np.abs(freq - probs[0, 0]), tol)
    # Given the first token was 2 (slot 1), the second follows p(slot 1).
    via1 = path[:, 1] == 1
    second = np.where(count[via1] >= 2, toks[path[via1, 2].clip(0)], bonus[via1])
    freq2 = np.bincount(second, minlength=vocab) / via1.sum()
    tol2 = 5 * np.sqrt(probs[0, 1] * (1 - probs[0, 1]) / via1.sum()) + 1e-9
    np.testing.assert_array_less(np.abs(freq2 - probs[0, 1]), tol2)
    assert (count >= 1).mean() > 0.3  # drafts were actually accepted

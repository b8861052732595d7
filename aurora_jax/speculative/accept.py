"""Accepting draft tokens after the target verified a tree.

Greedy: from the root, follow the child whose token equals the target's argmax as far as it
goes, then append the target's own argmax there (the bonus token). The committed tokens are
exactly those target-only greedy decoding would emit.

Sampling: multi-candidate speculative sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; the tree form of SpecInfer, Miao et al. 2024, and
EAGLE, Li et al. 2024). Our children are chosen deterministically (top-k of the draft), so each
candidate is a point mass: at node u with target distribution p, candidate x is accepted with
probability p(x); on rejection p loses x and is renormalised, and the next sibling is tried.
If every child is rejected the bonus is drawn from what remains of p. The token emitted at
each step is then distributed exactly as p, whatever the draft proposed: lossless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aurora_jax.sampling import SamplingRows, filtered_logprobs
from aurora_jax.speculative.tree import Tree


def greedy_accept(tree: Tree, target_argmax_BxT: jax.Array, max_depth: int):
    """Returns (path [B, max_depth+1] slot ids of accepted nodes, root first, -1 padded;
    num_accepted [B] draft nodes accepted; bonus [B] the target's token after the path)."""
    b, t = tree.tokens.shape

    def step(carry, _):
        cur_B, n_B, alive_B = carry
        want_B = jnp.take_along_axis(target_argmax_BxT, cur_B[:, None], 1)[:, 0]
        match_BxT = (tree.parent == cur_B[:, None]) & (tree.tokens == want_B[:, None]) & tree.valid
        found_B = jnp.any(match_BxT, axis=1) & alive_B
        nxt_B = jnp.where(found_B, jnp.argmax(match_BxT, axis=1).astype(jnp.int32), cur_B)
        return (nxt_B, n_B + found_B, found_B), jnp.where(found_B, nxt_B, -1)

    init = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool))
    (last_B, n_B, _), path_DxB = jax.lax.scan(step, init, None, length=max_depth)
    path = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), path_DxB.T], axis=1)
    bonus_B = jnp.take_along_axis(target_argmax_BxT, last_B[:, None], 1)[:, 0]
    return path, n_B, bonus_B


def sample_accept(keys_B, tree: Tree, target_probs_BxTxV: jax.Array, max_depth: int):
    """Speculative sampling over a tree with deterministic candidates, each row with its own
    PRNG key (`keys_B` [B]). `target_probs` are the target's filtered (temperature/top-p/top-k)
    distributions at every slot. Same outputs as greedy_accept."""
    b, t = tree.tokens.shape
    k_walk_B, k_bonus_B = jnp.moveaxis(jax.vmap(jax.random.split)(keys_B), 1, 0)

    def step(carry, d):
        cur_B, n_B, alive_B, p_BxV = carry
        cand_BxT = (tree.parent == cur_B[:, None]) & tree.valid & alive_B[:, None]
        u_BxT = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, d), (t,)))(
            k_walk_B)

        def try_child(c, j):
            accepted_B, pick_B, p = c
            tok_B = tree.tokens[:, j]
            trying = cand_BxT[:, j] & ~accepted_B
            p_tok = jnp.take_along_axis(p, tok_B[:, None], 1)[:, 0]
            ok = trying & (u_BxT[:, j] < p_tok)
            # Rejected: remove the token from p and renormalise (residual of a point mass).
            rej = trying & ~ok
            p_rm = p.at[jnp.arange(b), tok_B].set(0.0)
            p_rm = p_rm / jnp.maximum(p_rm.sum(-1, keepdims=True), 1e-30)
            p = jnp.where(rej[:, None], p_rm, p)
            return (accepted_B | ok, jnp.where(ok, j, pick_B), p), None

        (acc_B, pick_B, p_res), _ = jax.lax.scan(
            try_child, (jnp.zeros((b,), bool), cur_B, p_BxV), jnp.arange(t))
        nxt_B = jnp.where(acc_B, pick_B, cur_B).astype(jnp.int32)
        p_next = jnp.take_along_axis(target_probs_BxTxV, nxt_B[:, None, None], 1)[:, 0]
        # Where the walk stopped, keep the residual: the bonus is drawn from it.
        p_carry = jnp.where(acc_B[:, None], p_next, p_res)
        return (nxt_B, n_B + acc_B, acc_B, p_carry), jnp.where(acc_B, nxt_B, -1)

    p_root = target_probs_BxTxV[:, 0]
    init = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), p_root)
    (last_B, n_B, _, p_final), path_DxB = jax.lax.scan(step, init, jnp.arange(max_depth))
    path = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), path_DxB.T], axis=1)
    bonus_B = jax.vmap(jax.random.categorical)(k_bonus_B, jnp.log(jnp.maximum(p_final, 1e-38)))
    return path, n_B, bonus_B.astype(jnp.int32)


def accept(key, tree: Tree, logits_BxTxV: jax.Array, max_depth: int, rows: SamplingRows,
           position_B: jax.Array | None = None):
    """Accepts per row under its own sampling settings: greedy rows follow the argmax, sampled
    rows speculative sampling over the filtered target distribution. An all-greedy batch skips
    the vocabulary sort. Returns (path, num_accepted, bonus) as `greedy_accept`."""
    b, t, v = logits_BxTxV.shape
    argmax_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)

    def sampled():
        logp = filtered_logprobs(logits_BxTxV.reshape(b * t, v),
                                 rows.repeat(t)).reshape(b, t, v)  # every slot of a row
        # A greedy row's distribution is a point mass on its argmax: the walk then accepts
        # exactly the argmax children and the bonus is the argmax, as in greedy_accept.
        probs = jnp.where(rows.sampled[:, None, None], jnp.exp(logp),
                          jax.nn.one_hot(argmax_BxT, v, dtype=jnp.float32))
        return sample_accept(rows.keys(key, position_B), tree, probs, max_depth)

    return jax.lax.cond(jnp.any(rows.sampled), sampled,
                        lambda: greedy_accept(tree, argmax_BxT, max_depth))

"""Drafting without a model: n-gram lookup in the sequence's own tokens.

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; the reference-copying idea of
LLMA, Yang et al. 2023, "Inference with Reference: Lossless Acceleration of Large Language
Models"): text often repeats what came before it, code above all (names, signatures, test
cases, a docstring's phrases). The last `g` tokens of the sequence (prompt and output so far)
are looked up earlier in the same sequence; the tokens that followed the most recent match are
proposed as a chain. Longer n-grams are tried first (g = max_ngram .. 1). It costs no model
pass at all, so it pays from the first request, before a learned draft has trained.

Proposals are point masses, so the same acceptance rules keep the output exactly the target's
(spec/accept.py): greedy follows the target's argmax; sampling accepts a proposed token x with
probability p(x). Nodes with nothing to propose (no match, or the match's continuation runs
into the end of the sequence) are marked invalid and never accepted.

Everything runs on device inside the engine step over a fixed-shape token history [B, S].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aurora_jax.spec.tree import Tree, chain


def lookup(history_BxS: jax.Array, length_B: jax.Array, depth: int, max_ngram: int):
    """The tokens that followed the most recent earlier occurrence of the sequence's longest
    matching suffix (up to `max_ngram` tokens).

    `history[b, :length[b]]` is sequence b (the last token is the newest). Returns (tokens
    [B, depth], valid [B, depth]): valid where a match was found and its continuation lies
    inside the known sequence."""
    b, s = history_BxS.shape
    pos_S = jnp.arange(s, dtype=jnp.int32)
    start_B = jnp.zeros((b,), jnp.int32)
    found_B = jnp.zeros((b,), bool)
    for g in range(max_ngram, 0, -1):  # longest suffix first
        suffix_idx = jnp.maximum(length_B[:, None] - g + jnp.arange(g)[None], 0)
        suffix_Bxg = jnp.take_along_axis(history_BxS, suffix_idx, 1)
        match_BxS = jnp.ones((b, s), bool)
        for i in range(g):  # history[j + i] == suffix[i] for every i
            shifted = jnp.roll(history_BxS, -i, axis=1)
            match_BxS &= shifted == suffix_Bxg[:, i:i + 1]
        # j + g is where the continuation starts: before the newest token, and not the suffix
        # itself (j + g <= length - 1 excludes j = length - g).
        match_BxS &= (pos_S[None] + g <= length_B[:, None] - 1) & (length_B[:, None] > g)
        any_B = jnp.any(match_BxS, 1)
        last_j = s - 1 - jnp.argmax(match_BxS[:, ::-1], axis=1)  # the most recent match
        take = any_B & ~found_B
        start_B = jnp.where(take, last_j + g, start_B)
        found_B |= take
    idx_BxD = start_B[:, None] + jnp.arange(depth, dtype=jnp.int32)[None]
    tokens = jnp.take_along_axis(history_BxS, jnp.minimum(idx_BxD, s - 1), 1)
    valid = found_B[:, None] & (idx_BxD <= length_B[:, None] - 1)
    return tokens, valid


def ngram_tree(history_BxS, length_B, root_B, depth: int, max_ngram: int) -> Tree:
    """A chain of up to `depth` looked-up tokens after the root (the newest token)."""
    tokens, valid = lookup(history_BxS, length_B, depth, max_ngram)
    tree = chain(root_B, tokens)
    ok = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], 1)
    return tree.replace(valid=ok)


def write_history(history_BxS, start_B, tokens_BxR, active_B):
    """Writes each active sequence's committed tokens at start[b] .. start[b] + R - 1 (tokens
    past what the step emitted are overwritten by the next step's)."""
    def one(h_S, s, t_R, a):
        return jnp.where(a, jax.lax.dynamic_update_slice(h_S, t_R, (s,)), h_S)

    return jax.vmap(one)(history_BxS, start_B, tokens_BxR.astype(history_BxS.dtype), active_B)

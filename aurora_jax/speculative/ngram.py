"""Drafting without a model: n-gram lookup in the sequence's own tokens.

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; the reference-copying idea of
LLMA, Yang et al. 2023, "Inference with Reference: Lossless Acceleration of Large Language
Models"): text often repeats what came before it, code above all (names, signatures, test
cases, a docstring's phrases). The last `g` tokens of the sequence (prompt and output so far)
are looked up earlier in the same sequence; the tokens that followed the most recent match are
proposed as a chain. Longer n-grams are tried first (g = max_ngram .. 1). It costs no model
pass at all, so it pays from the first request, before a learned draft has trained.

Other requests repeat each other too (a chat template's phrasing, the same library calls):
the engine keeps the newest finished sequences in a ring, and a suffix that the sequence
itself lacks is looked up there as well (the idea of LLMA's retrieved references; here the
references are the server's own recent outputs).

Proposals are point masses, so the same acceptance rules keep the output exactly the target's
(speculative/accept.py): greedy follows the target's argmax; sampling accepts a proposed token
x with probability p(x). Nodes with nothing to propose (no match, or the match's continuation
runs into the end of the sequence) are marked invalid and never accepted.

Everything runs on device inside the engine step over a fixed-shape token history [B, S].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from aurora_jax.speculative.tree import Tree, chain

RECENT_MIN_NGRAM = 2
"""Shortest suffix looked up in other requests' sequences. A single token almost always occurs
somewhere in them, and its continuation there is mostly wrong: simulated on the default run's
SmolLM2 traffic (depth 3, the 16 newest sequences), 2-grams and longer gave the higher
speedup (x1.55 code, x1.39 prose, against x1.53 and x1.38 with 1-grams and x1.51 and x1.29
without other requests)."""


def _most_recent_match(refs_BxRxS, lens_BxR, suffix_Bxg):
    """Where `suffix` occurs in the references with at least one known token after it:
    (found [B], row [B], continuation start [B]) of the match in the highest row, at the
    latest position. Reference r of batch row b is `refs[b, r, :lens[b, r]]`."""
    b, r, s = refs_BxRxS.shape
    g = suffix_Bxg.shape[1]
    match = jnp.ones((b, r, s), bool)
    for i in range(g):  # refs[j + i] == suffix[i] for every i
        match &= jnp.roll(refs_BxRxS, -i, axis=2) == suffix_Bxg[:, None, i:i + 1]
    pos_S = jnp.arange(s, dtype=jnp.int32)
    # j + g is where the continuation starts: it must be a known token (<= len - 1); for a
    # sequence's own history that also excludes the suffix itself (j = len - g).
    match &= pos_S[None, None] + g <= lens_BxR[:, :, None] - 1
    flat = match.reshape(b, r * s)
    last = r * s - 1 - jnp.argmax(flat[:, ::-1], axis=1)  # highest row, then latest position
    return jnp.any(flat, 1), last // s, last % s + g


def lookup(history_BxS: jax.Array, length_B: jax.Array, depth: int, max_ngram: int,
           recent_MxS: jax.Array | None = None, recent_len_M: jax.Array | None = None):
    """The tokens that followed the most recent earlier occurrence of the sequence's longest
    matching suffix (up to `max_ngram` tokens).

    `history[b, :length[b]]` is sequence b (the last token is the newest). With `recent`
    (other requests' finished sequences, oldest row first; row m is
    `recent[m, :recent_len[m]]`), a suffix of at least RECENT_MIN_NGRAM tokens that the
    sequence itself lacks is looked up there too (the newest sequence first); at equal
    length the sequence's own match wins. Returns (tokens [B, depth], valid [B, depth]):
    valid where a match was found and its continuation lies inside the known tokens."""
    b, s = history_BxS.shape
    refs = [(history_BxS[:, None], length_B[:, None], 1)]
    if recent_MxS is not None and recent_len_M is not None and recent_MxS.shape[0] > 0:
        m = recent_MxS.shape[0]
        refs.append((jnp.broadcast_to(recent_MxS[None], (b, m, recent_MxS.shape[1])),
                     jnp.broadcast_to(recent_len_M[None], (b, m)), RECENT_MIN_NGRAM))
    tokens_BxD = jnp.zeros((b, depth), history_BxS.dtype)
    valid_BxD = jnp.zeros((b, depth), bool)
    found_B = jnp.zeros((b,), bool)
    for g in range(max_ngram, 0, -1):  # longest suffix first
        suffix_idx = jnp.maximum(length_B[:, None] - g + jnp.arange(g)[None], 0)
        suffix_Bxg = jnp.take_along_axis(history_BxS, suffix_idx, 1)
        for refs_BxRxS, lens_BxR, min_g in refs:  # own history first
            if g < min_g:
                continue
            hit_B, row_B, start_B = _most_recent_match(refs_BxRxS, lens_BxR, suffix_Bxg)
            hit_B &= length_B > g
            src_BxS = jnp.take_along_axis(refs_BxRxS, row_B[:, None, None], 1)[:, 0]
            src_len_B = jnp.take_along_axis(lens_BxR, row_B[:, None], 1)[:, 0]
            idx_BxD = start_B[:, None] + jnp.arange(depth, dtype=jnp.int32)[None]
            cont = jnp.take_along_axis(src_BxS, jnp.minimum(idx_BxD, src_BxS.shape[1] - 1), 1)
            take = hit_B & ~found_B
            tokens_BxD = jnp.where(take[:, None], cont, tokens_BxD)
            valid_BxD = jnp.where(take[:, None], idx_BxD <= src_len_B[:, None] - 1, valid_BxD)
            found_B |= take
    return tokens_BxD, valid_BxD


def ngram_tree(history_BxS, length_B, root_B, depth: int, max_ngram: int, recent_MxS=None,
               recent_len_M=None) -> Tree:
    """A chain of up to `depth` looked-up tokens after the root (the newest token)."""
    tokens, valid = lookup(history_BxS, length_B, depth, max_ngram, recent_MxS, recent_len_M)
    tree = chain(root_B, tokens)
    ok = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], 1)
    return dataclasses.replace(tree, valid=ok)


def archive(recent_MxS, recent_len_M, next_row, history_BxS, length_B, done_B):
    """The ring of recent sequences with each finished one (`done`) written over the oldest
    rows; `next_row` is the ring's next row to write. Returns (recent, recent_len, next_row)
    with rows still in ring order (see `oldest_first`)."""
    m = recent_MxS.shape[0]
    rank_B = jnp.cumsum(done_B.astype(jnp.int32)) - 1
    row_B = jnp.where(done_B, (next_row + rank_B) % m, m)  # m: dropped
    width = min(recent_MxS.shape[1], history_BxS.shape[1])
    recent_MxS = recent_MxS.at[row_B, :width].set(history_BxS[:, :width], mode="drop")
    recent_len_M = recent_len_M.at[row_B].set(jnp.minimum(length_B, width), mode="drop")
    return recent_MxS, recent_len_M, (next_row + done_B.sum()) % m


def oldest_first(recent_MxS, recent_len_M, next_row):
    """The ring's rows from the oldest to the newest (the row `next_row` is the oldest);
    (None, None) for an empty ring, which `lookup` then skips."""
    if recent_MxS.shape[0] == 0:
        return None, None
    return jnp.roll(recent_MxS, -next_row, axis=0), jnp.roll(recent_len_M, -next_row, axis=0)


def write_history(history_BxS, start_B, tokens_BxR, active_B):
    """Writes each active sequence's committed tokens at start[b] .. start[b] + R - 1 (tokens
    past what the step emitted are overwritten by the next step's)."""
    def one(h_S, s, t_R, a):
        return jnp.where(a, jax.lax.dynamic_update_slice(h_S, t_R, (s,)), h_S)

    return jax.vmap(one)(history_BxS, start_B, tokens_BxR.astype(history_BxS.dtype), active_B)

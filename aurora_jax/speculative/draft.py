"""Drafting with an EAGLE-3 head: catch up on committed tokens, then propose a tree.

Feature alignment (EAGLE-3, Li et al. 2025, arXiv 2503.01840): the draft row at position j
reads the token x[j+1] and the target's aux features at position j, and predicts x[j+2].
Once the target has committed x[..c'] (its KV cached up to c'-1, the last token x[c'] the
root of the next tree), the draft "catches up" on the rows whose token and target features
became known in the last step, in one causal forward that also writes them to the draft KV
cache. Its last row reads the root and predicts the first draft token.

Tree proposal (EAGLE-2, Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with
Dynamic Draft Trees"): every node keeps its cumulative draft log-probability. At each depth
the `topk` best nodes of the previous depth are expanded by their `topk` most likely children;
after `depth` levels the `num_draft_tokens` best nodes of all levels form the tree. A child's
score never exceeds its parent's, and ties go to the earlier (shallower) node, so the kept set
always contains every kept node's parent. Chain mode is the same with topk = 1.

Provisional tree nodes never touch the draft KV cache: their keys and values live in a side
buffer for the duration of one proposal, so the cache only ever holds committed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aurora_jax.models.attention import causal_mask
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.speculative.tree import Tree


def catch_up(draft, embed_VxH, cache, draft_len_B, tokens_BxR, aux_BxRxAxH, count_B):
    """Runs the draft over the `count[b]` rows at positions draft_len[b] + r (tokens and the
    target aux features of the previous positions), caching their keys and values.

    Returns (root log-probs [B, Vd], root hidden [B, H], cache, draft_len + count): the last
    row is the root, whose output proposes the first draft token."""
    r = tokens_BxR.shape[1]
    positions_BxR = draft_len_B[:, None] + jnp.arange(r, dtype=jnp.int32)[None]
    logits, h, cache = draft(embed_VxH[tokens_BxR], draft.project(aux_BxRxAxH), positions_BxR,
                             causal_mask(count_B, r), cache, draft_len_B)
    last_B = jnp.maximum(count_B - 1, 0)
    logits_BxVd = jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0]
    h_BxH = jnp.take_along_axis(h, last_B[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(logits_BxVd, -1), h_BxH, cache, draft_len_B + count_B


def propose(draft, embed_VxH, cache, draft_len_B, root_B, root_logp_BxVd, root_h_BxH,
            spec: SpecConfig):
    """Proposes a tree after `catch_up`. Returns (Tree with target-vocabulary tokens,
    draft log-prob of each node's token given its parent [B, N+1], root 0)."""
    b = root_B.shape[0]
    k, depth = spec.width, spec.depth
    buf = max(1, (depth - 1) * k)  # side-buffer slots: the nodes expanded at depths 1..depth-1
    kv_shape = (b, buf, draft.cfg.num_kv_heads, draft.cfg.head_dim)
    tree_k = jnp.zeros(kv_shape, cache.k[0].dtype)
    tree_v = jnp.zeros(kv_shape, cache.v[0].dtype)

    lp_Bxk, tok_Bxk = jax.lax.top_k(root_logp_BxVd, k)
    scores, tokens, lps = [lp_Bxk], [tok_Bxk], [lp_Bxk]
    parents = [jnp.full((b, k), -1, jnp.int32)]
    depths = [jnp.ones((b, k), jnp.int32)]
    beam_idx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))  # pool index
    beam_score, beam_tok = lp_Bxk, tok_Bxk
    beam_h = jnp.broadcast_to(root_h_BxH[:, None], (b, k, root_h_BxH.shape[-1]))
    beam_seen = jnp.zeros((b, k, buf), bool)  # buffer slots of each beam node's ancestors
    offset = k
    for d in range(2, depth + 1):
        slots_k = (d - 2) * k + jnp.arange(k)
        visible = beam_seen | jax.nn.one_hot(slots_k, buf, dtype=bool)[None]
        positions = jnp.broadcast_to((draft_len_B + d - 2)[:, None], (b, k))
        embeds = embed_VxH[draft.to_target_ids(beam_tok)]
        logits, h, tree_k, tree_v = draft.tree_step(embeds, beam_h, positions, slots_k, visible,
                                                    tree_k, tree_v, cache, draft_len_B)
        c_lp, c_tok = jax.lax.top_k(jax.nn.log_softmax(logits, -1), k)  # [B, k, k]
        c_score = (beam_score[:, :, None] + c_lp).reshape(b, k * k)
        scores.append(c_score)
        tokens.append(c_tok.reshape(b, k * k))
        lps.append(c_lp.reshape(b, k * k))
        parents.append(jnp.repeat(beam_idx, k, axis=1))
        depths.append(jnp.full((b, k * k), d, jnp.int32))
        beam_score, pick = jax.lax.top_k(c_score, k)
        src = pick // k  # which beam node each new beam node hangs from
        beam_idx = offset + pick
        beam_tok = jnp.take_along_axis(tokens[-1], pick, 1)
        beam_h = jnp.take_along_axis(h, src[:, :, None], 1)
        beam_seen = jnp.take_along_axis(visible, src[:, :, None], 1)
        offset += k * k

    pool_score = jnp.concatenate(scores, 1)
    # top_k breaks ties by lower index, and parents precede children in the pool.
    _, keep = jax.lax.top_k(pool_score, spec.nodes)
    keep = jnp.sort(keep, axis=1)  # pool order: parents before children
    n = spec.nodes
    slot_of = jnp.zeros((b, pool_score.shape[1]), jnp.int32)
    slot_of = slot_of.at[jnp.arange(b)[:, None], keep].set(jnp.arange(1, n + 1, dtype=jnp.int32))
    parent_pool = jnp.take_along_axis(jnp.concatenate(parents, 1), keep, 1)
    parent = jnp.where(parent_pool < 0, 0,
                       jnp.take_along_axis(slot_of, jnp.maximum(parent_pool, 0), 1))

    def with_root(root, x):
        return jnp.concatenate([root, jnp.take_along_axis(jnp.concatenate(x, 1), keep, 1)], 1)

    draft_tokens = draft.to_target_ids(jnp.take_along_axis(jnp.concatenate(tokens, 1), keep, 1))
    tree = Tree(tokens=jnp.concatenate([root_B[:, None], draft_tokens], 1).astype(jnp.int32),
                parent=jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parent], 1),
                depth=with_root(jnp.zeros((b, 1), jnp.int32), depths),
                valid=jnp.ones((b, n + 1), bool))
    return tree, with_root(jnp.zeros((b, 1), jnp.float32), lps)

"""The rejected-node ("discard") term of the draft objective and its variants.

Aurora (arXiv 2602.06932) treats the tree nodes the target rejected during verification as
implicit negative feedback: the target's distribution there was computed anyway. The term is a
weighted mean over the supervised nodes i of a batch (rejected, depth >= 1):

    discard = sum_i w_i * l_i / N        N = number of supervised nodes in the batch

Per-node objectives l_i (`LossConfig.discard`):
- kl: KL(p_target || q_draft) at the node's own context (the node's token included), as in
  the paper: it trains the draft where its own tree wandered off the committed path. Nodes
  whose target argmax lies outside the draft vocabulary contribute 0.
- tv: total variation 1 - sum_x min(p(x), q(x)) at the node's context: exactly the probability
  that speculative sampling rejects a token drafted there (Leviathan et al. 2023, "Fast
  Inference from Transformers via Speculative Decoding", arXiv 2211.17192).
- unlikelihood: at the parent's context, -log(1 - q(y)) for the rejected token y where the
  draft gave it more probability than the target (Welleck et al. 2019, "Neural Text
  Generation with Unlikelihood Training", arXiv 1908.04319): it lowers what was proposed and
  refused, the direct negative signal.

Which nodes (`discard_nodes`): all rejected nodes (one draft pass per tree depth: a node needs
its parent's output), or the frontier: rejected nodes whose parent was accepted, where the
target first disagreed. A frontier node's ancestors are committed tokens, so the TTT unroll
already computed everything it needs (its parent's hidden state is TTT step d's at the root's
row, its context TTT's keys and values): one extra pass over the tree rows instead of
`tree_depth`, and none at all for unlikelihood.

Weights (`discard_weight`), normalised to mean 1 over the supervised nodes: uniform; depth
(step_weight^(depth-1), like the TTT steps); draft_prob (the current draft's probability of
proposing the rejected token, held constant: confident mistakes weigh most).

Cheaper (`discard_trees` = m): each sequence's term uses m of its valid trees, drawn
uniformly without replacement, each node weighted by 1 / its inclusion probability, and N
stays the full batch's count: an unbiased estimate of the full term (exactly so for uniform
and depth weights; draft_prob's normalisation is then a ratio estimate) at about m/S of the
cost of the draft passes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from aurora_jax.learn.divergence import draft_vocab_target, kl, masked_mean, total_variation
from aurora_jax.speculative.tree import ancestor_mask


@struct.dataclass
class TTTWork:
    """What the TTT unroll computed, per step k = 1..K (lists of K arrays), reused here."""

    keys: list  # [B, R, K, D] each
    values: list  # [B, R, K, D]
    hidden: list  # [B, R, H] the step's output hidden state
    logits: list  # [B, R, Vd] the step's draft logits


@struct.dataclass
class Trees:
    """The batch's trees with what every variant needs, [B, S, N1, ...] (slot 0 the root)."""

    tokens: jax.Array  # [B, S, N1] target ids
    parent: jax.Array  # [B, S, N1] -1 for the root
    hidden: jax.Array  # [B, S, N1, H] target final hidden at each node
    anc: jax.Array  # [B, S, N1, N1] ancestor-or-self
    depth: jax.Array  # [B, S, N1]
    accepted: jax.Array  # [B, S, N1]
    root_row: jax.Array  # [B, S] the draft row that read the root token
    supervised: jax.Array  # [B, S, N1] bool: nodes the term averages over
    inv_prob: jax.Array  # [B, S] 1 / the tree's inclusion probability


def tree_geometry(batch, rows: int, cfg) -> Trees:
    """Depths, masks and the supervised node set of every tree in `batch` (a LearnBatch)."""
    b, s, n1 = batch.tree_tokens.shape
    anc = ancestor_mask(batch.tree_parent.reshape(b * s, n1)).reshape(b, s, n1, n1)
    depth = anc.sum(-1) - 1
    root_row = jnp.clip(batch.tree_root_pos - 1, 0, rows - 1)
    sup = batch.tree_valid[..., None] & ~batch.tree_accepted & (depth >= 1)
    if cfg.discard_nodes == "frontier":
        parent_acc = jnp.take_along_axis(batch.tree_accepted, jnp.maximum(batch.tree_parent, 0),
                                         2) & (batch.tree_parent >= 0)
        # TTT computed step d (the parent's output) at the root's row only while the parent's
        # token x[root_row + d] lies inside the window, and only for d <= K.
        inside = root_row[..., None] + depth < batch.length[:, None, None]
        sup = sup & parent_acc & (depth <= cfg.ttt_steps) & inside
    else:
        sup = sup & (depth <= cfg.tree_depth)
    return Trees(batch.tree_tokens, batch.tree_parent, batch.tree_hidden, anc, depth,
                 batch.tree_accepted, root_row, sup, jnp.ones((b, s), jnp.float32))


def subsample(trees: Trees, valid_BxS, m: int, key) -> Trees:
    """m trees per sequence, uniformly among its valid ones, with inverse inclusion weights."""
    b, s = valid_BxS.shape
    u = jnp.where(valid_BxS, jax.random.uniform(key, (b, s)), -1.0)
    _, idx = jax.lax.top_k(u, m)  # [B, m]: valid trees first, in random order
    n_valid = valid_BxS.sum(-1, keepdims=True)
    inv_prob = jnp.where(n_valid > m, n_valid / m, 1.0).astype(jnp.float32)
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, idx.reshape(b, m, *([1] * (x.ndim - 2))), 1)
    picked = jax.tree.map(take, dataclasses.replace(trees,
                                                    inv_prob=jnp.ones((b, s), jnp.float32)))
    return picked.replace(inv_prob=jnp.broadcast_to(inv_prob, (b, m)))


def _row_gather(x_BxRx, rows_BxS):
    """x[b, rows[b, s]] -> [B, S, ...]."""
    b, s = rows_BxS.shape
    return jnp.take_along_axis(x_BxRx, rows_BxS.reshape(b, s, *([1] * (x_BxRx.ndim - 2))), 1)


def _all_nodes_pass(draft, embed_VxH, trees: Trees, ttt: TTTWork, cfg):
    """Draft logits at every node from its own context: all branches of all trees together,
    one pass per depth (a node needs its parent's output), each node seeing the committed
    rows up to its root (step-1 keys) and its ancestors (the tree mask)."""
    k1, v1, h1 = ttt.keys[0], ttt.values[0], ttt.hidden[0]
    b, s, n1 = trees.tokens.shape
    r, q_rows = k1.shape[1], s * n1
    same_tree = jnp.eye(s, dtype=bool)[None, :, None, :, None]
    self_mask = (same_tree & trees.anc[:, :, :, None, :]).reshape(b, q_rows, q_rows)
    # The root's row is a committed row (in the context), so tree slot 0 is never a key.
    self_mask = self_mask & (jnp.arange(q_rows) % n1 != 0)[None, None]
    ctx_mask = jnp.arange(r)[None, None] <= trees.root_row[..., None]  # [B, S, R]
    ctx_mask = jnp.repeat(ctx_mask, n1, axis=1)  # [B, Q, R]
    root_h = _row_gather(h1, trees.root_row)  # [B, S, H]
    parent = jnp.maximum(trees.parent, 0)
    positions = (trees.root_row[..., None] + trees.depth).reshape(b, q_rows)
    embeds = embed_VxH[trees.tokens.reshape(b, q_rows)]
    out_h = jnp.broadcast_to(root_h[:, :, None], (b, s, n1, h1.shape[-1]))
    logits = jnp.zeros(())  # set by the first pass (tree_depth >= 1)
    for _ in range(cfg.tree_depth):
        parent_h = jnp.take_along_axis(out_h, parent[..., None], 2)
        hidden_in = jnp.where((trees.parent <= 0)[..., None], root_h[:, :, None], parent_h)
        logits, h, _, _ = draft.masked_step(embeds, hidden_in.reshape(b, q_rows, -1), positions,
                                            k1, v1, ctx_mask, self_mask)
        out_h = h.reshape(b, s, n1, -1)
    return logits.reshape(b, s, n1, -1)


def _ttt_at_nodes(xs: list, trees: Trees):
    """TTT step (depth+1)'s value at each tree's root row: what the unroll computed at a node
    whose ancestors were all committed (slot 0: step 1). [B, S, N1, ...]."""
    per_step = jnp.stack([_row_gather(x, trees.root_row) for x in xs], 2)  # [B, S, K, ...]
    k = jnp.clip(trees.depth, 0, len(xs) - 1)
    return jnp.take_along_axis(per_step, k.reshape(*k.shape, *([1] * (per_step.ndim - 3))), 2)


def _frontier_pass(draft, embed_VxH, trees: Trees, ttt: TTTWork):
    """Draft logits at frontier nodes in one pass: a depth-d node reads its token with TTT
    step d's hidden state (its parent's output) and sees the committed rows up to its root
    (step 1) plus TTT steps 2..d at the root's row (its committed ancestors)."""
    b, s, n1 = trees.tokens.shape
    steps, r = len(ttt.keys), ttt.keys[0].shape[1]
    q_rows = s * n1
    parent_h = _ttt_at_nodes(ttt.hidden, dataclasses.replace(trees, depth=trees.depth - 1))
    rows = jnp.arange(r)[None, None, None]  # [1, 1, 1, R]
    root = trees.root_row[..., None, None]  # [B, S, 1, 1]
    d = trees.depth[..., None]  # [B, S, N1, 1]
    blocks = [jnp.broadcast_to(rows <= root, (b, s, n1, r))]
    blocks += [(rows == root) & (d >= k) for k in range(2, steps + 1)]
    ctx_mask = jnp.concatenate(blocks, -1).reshape(b, q_rows, steps * r)
    self_mask = jnp.broadcast_to(jnp.eye(q_rows, dtype=bool)[None], (b, q_rows, q_rows))
    logits, _, _, _ = draft.masked_step(
        embed_VxH[trees.tokens.reshape(b, q_rows)], parent_h.reshape(b, q_rows, -1),
        (trees.root_row[..., None] + trees.depth).reshape(b, q_rows),
        jnp.concatenate(ttt.keys, 1), jnp.concatenate(ttt.values, 1), ctx_mask, self_mask)
    return logits.reshape(b, s, n1, -1)


def _depth_weight(cfg, depth):
    """step_weight^(depth-1), as the TTT steps weigh (the root counted as depth 1)."""
    return cfg.step_weight ** (jnp.maximum(depth, 1) - 1).astype(jnp.float32)


def node_losses(draft, embed_VxH, target_logits_fn, trees: Trees, ttt: TTTWork, cfg):
    """(per-node loss l [B, S, N1], per-node weight w [B, S, N1] before the inverse inclusion
    probability, metrics). Both are zero outside `trees.supervised`."""
    b, s, n1 = trees.tokens.shape
    d2t, t2d = draft.d2t[...], draft.t2d[...]
    sup = trees.supervised
    # The draft's logits at each node (predicting its children): from TTT where the node's
    # path was committed (the root, accepted nodes), else from a pass over the tree.
    ttt_logits = _ttt_at_nodes(ttt.logits, trees)
    need_pass = cfg.discard != "unlikelihood" or cfg.discard_nodes == "all"
    if not need_pass:
        at_node = ttt_logits
    elif cfg.discard_nodes == "all":
        at_node = jnp.where((jnp.arange(n1) == 0)[None, None, :, None], ttt_logits,
                            _all_nodes_pass(draft, embed_VxH, trees, ttt, cfg))
    else:
        at_node = jnp.where(trees.accepted[..., None] | (trees.depth == 0)[..., None],
                            ttt_logits, _frontier_pass(draft, embed_VxH, trees, ttt))
    logq = jax.nn.log_softmax(at_node, -1)  # [B, S, N1, Vd]
    parent = jnp.maximum(trees.parent, 0)
    parent_logq = jnp.take_along_axis(logq, parent[..., None], 2)
    # The rejected token's draft id (-1 outside the draft vocabulary, e.g. after a refresh).
    d_index = jnp.where(t2d, jnp.cumsum(t2d) - 1, -1)[trees.tokens]
    in_draft = d_index >= 0
    q_y = jnp.where(in_draft, jnp.exp(jnp.take_along_axis(
        parent_logq, jnp.maximum(d_index, 0)[..., None], -1)[..., 0]), 0.0)
    p_d, p, in_vocab = draft_vocab_target(target_logits_fn(trees.hidden), d2t, t2d)
    metrics = {}
    if cfg.discard == "kl":
        loss = jnp.where(in_vocab, kl(p_d, logq), 0.0)
    elif cfg.discard == "tv":
        loss = total_variation(p, jnp.exp(logq), d2t)
    else:
        p_y = jnp.take_along_axis(p.reshape(b, s, -1), (parent * p.shape[-1] + trees.tokens)
                                  .reshape(b, s, n1), 2)  # the target's p(y) at the parent
        disagree = in_draft & (q_y > p_y)
        loss = jnp.where(disagree, -jnp.log(jnp.maximum(1.0 - q_y, 1e-6)), 0.0)
        metrics["discard_disagree"] = masked_mean(disagree, sup)
    if cfg.discard_weight == "depth":
        w = _depth_weight(cfg, trees.depth)
    elif cfg.discard_weight == "draft_prob":
        w = jax.lax.stop_gradient(q_y)
    else:
        w = jnp.ones_like(loss)
    if need_pass:  # the draft's own prediction at the node agrees with the target's
        correct = draft.to_target_ids(jnp.argmax(at_node, -1)) == jnp.argmax(p, -1)
        metrics["discard_acc"] = masked_mean(correct, sup)
    return jnp.where(sup, loss, 0.0), jnp.where(sup, w, 0.0), metrics


def discard_term(draft, embed_VxH, target_logits_fn, batch, ttt: TTTWork, cfg, key):
    """The rejected-node term (see the module docstring). Returns (loss, metrics)."""
    trees = tree_geometry(batch, ttt.keys[0].shape[1], cfg)
    n_sup = jnp.sum(trees.supervised)
    w_norm = None
    if cfg.discard_weight == "depth":  # mean-1 normalisation from the full batch's masks
        w_norm = masked_mean(_depth_weight(cfg, trees.depth), trees.supervised)
    if cfg.discard_trees and cfg.discard_trees < batch.tree_tokens.shape[1]:
        trees = subsample(trees, batch.tree_valid, cfg.discard_trees, key)
    loss_i, w_i, metrics = node_losses(draft, embed_VxH, target_logits_fn, trees, ttt, cfg)
    inv = trees.inv_prob[..., None]
    if cfg.discard_weight == "draft_prob":  # normalised over the nodes at hand (ratio)
        w_norm = jnp.sum(w_i * inv) / jnp.maximum(jnp.sum(trees.supervised * inv), 1e-9)
    if w_norm is not None:
        w_i = w_i / jnp.maximum(w_norm, 1e-9)
    loss = jnp.sum(w_i * inv * loss_i) / jnp.maximum(n_sup, 1)
    metrics.update(discard_loss=loss, rejected_nodes=n_sup.astype(jnp.float32))
    return loss, metrics

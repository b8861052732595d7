"""The draft's training objective, from committed sequences and from rejected tree nodes.

    L = sum_k w^(k-1) E_committed[ KL(p_target || q_draft at TTT step k) ]
        + lambda_discard * E_rejected nodes[ KL(p_target || q_draft) ]
        (+ tv_weight * the same weighted sum of total variation, if asked)

First term: EAGLE-3's training-time test (Li et al. 2025, "EAGLE-3: Scaling up Inference
Acceleration of Large Language Models via Training-Time Test", arXiv 2503.01840). Row j of a
committed sequence reads token x[j+1] and the target's aux features at j (step 1); step k
reads x[j+k] and the draft's own hidden state from step k-1 at the same row, at position
j+k-1, and sees step 1's rows <= j and its own earlier steps at row j: exactly what the draft
sees when it drafts a chain from root j at serving time. The target distribution is
renormalised over the draft vocabulary (forward KL, i.e. soft-label cross-entropy minus the
target's entropy). Positions whose target argmax lies outside the draft vocabulary are left
out of the KL (the draft can never propose that token; they are counted in metrics).

Second term: Aurora (arXiv 2602.06932) adds supervision at tree nodes the target rejected:
verification already computed the target's distribution there. All branches of all trees go
through the draft together, one pass per depth, each node attending to the committed rows
before its root and to its ancestors (the tree mask), as during drafting.

Total variation between p and q is one minus the acceptance probability of speculative
sampling (Leviathan et al. 2023), so it is offered as an optional extra term.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from aurora_jax.errors import ConfigError
from aurora_jax.spec.tree import ancestor_mask


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which terms the draft objective has and how they weigh."""

    ttt_steps: int = 5
    """K: training-time-test unroll length."""
    step_weight: float = 0.8
    """w: step k of the unroll weighs w^(k-1)."""
    lambda_discard: float = 0.5
    """Weight of the KL at rejected tree nodes (0 gives the plain EAGLE-3 loss)."""
    tv_weight: float = 0.0
    """Weight of an extra total-variation term (1 - acceptance probability)."""
    tree_depth: int = 8
    """Deepest tree node the discard term reaches (one draft pass per depth)."""

    def __post_init__(self):
        if self.ttt_steps < 1:
            raise ConfigError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if not 0 < self.step_weight <= 1:
            raise ConfigError(f"step_weight must be in (0, 1], got {self.step_weight}")
        if self.lambda_discard < 0 or self.tv_weight < 0:
            raise ConfigError("lambda_discard and tv_weight must be >= 0")
        if self.tree_depth < 1:
            raise ConfigError(f"tree_depth must be >= 1, got {self.tree_depth}")


@struct.dataclass
class LearnBatch:
    """Fixed-shape training data: B sequences of up to T committed tokens, S trees each."""

    tokens: jax.Array  # [B, T] committed tokens
    aux: jax.Array  # [B, T, A, H] target aux features at each position
    target_hidden: jax.Array  # [B, T, H] target final normed hidden (next-token logits)
    length: jax.Array  # [B] positions that carry features
    tree_tokens: jax.Array  # [B, S, N+1] slot 0 the root
    tree_parent: jax.Array  # [B, S, N+1] -1 for the root
    tree_hidden: jax.Array  # [B, S, N+1, H] target final hidden at every node
    tree_accepted: jax.Array  # [B, S, N+1] bool, on the accepted path (root included)
    tree_root_pos: jax.Array  # [B, S] position of the root token in the sequence
    tree_valid: jax.Array  # [B, S] bool


def draft_vocab_target(logits_xV, d2t_Vd, t2d_V):
    """(target distribution over the draft vocabulary, renormalised [..., Vd]; full target
    distribution [..., V]; whether the target's argmax is in the draft vocabulary [...])."""
    p = jax.nn.softmax(logits_xV.astype(jnp.float32), -1)
    ids = jnp.arange(d2t_Vd.shape[0]) + d2t_Vd
    p_d = p[..., ids]
    p_d = p_d / jnp.maximum(p_d.sum(-1, keepdims=True), 1e-30)
    return p_d, p, t2d_V[jnp.argmax(logits_xV, -1)]


def kl(p_xVd, logq_xVd):
    """Forward KL(p || q) per position (0 log 0 = 0)."""
    return jnp.sum(jax.scipy.special.xlogy(p_xVd, p_xVd) - p_xVd * logq_xVd, -1)


def total_variation(p_xV, q_xVd, d2t_Vd):
    """TV between the full target distribution and the draft's (zero outside its vocab)."""
    ids = jnp.arange(d2t_Vd.shape[0]) + d2t_Vd
    return 1.0 - jnp.sum(jnp.minimum(p_xV[..., ids], q_xVd), -1)


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _targets(target_logits, draft):
    """What every term needs from the target logits, computed once: (p over the draft vocab,
    p, argmax in draft vocab, argmax)."""
    p_d, p, in_vocab = draft_vocab_target(target_logits, draft.d2t[...], draft.t2d[...])
    return p_d, p, in_vocab, jnp.argmax(target_logits, -1)


def _term(logits_q, targets, mask, draft, cfg: LossConfig):
    """(KL (+ TV) averaged over mask & in-vocab, accuracy over mask, correct [...] bool)."""
    d2t = draft.d2t[...]
    p_d, p, in_vocab, argmax = targets
    logq = jax.nn.log_softmax(logits_q, -1)
    loss = _masked_mean(kl(p_d, logq), mask & in_vocab)
    if cfg.tv_weight:
        loss = loss + cfg.tv_weight * _masked_mean(
            total_variation(p, jnp.exp(logq), d2t), mask)
    correct = draft.to_target_ids(jnp.argmax(logits_q, -1)) == argmax
    return loss, _masked_mean(correct, mask), correct, _masked_mean(~in_vocab, mask)


def ttt_loss(draft, embed_VxH, target_logits_fn, batch: LearnBatch, cfg: LossConfig):
    """The committed-sequence term. Returns (loss, metrics, step-1 (k, v, hidden) for the
    discard term)."""
    b, t = batch.tokens.shape
    r = t - 1  # rows: row j reads x[j+1]
    pos = jnp.arange(r)
    row_ok = pos[None] + 1 < batch.length[:, None]  # [B, R]
    targets = _targets(target_logits_fn(batch.target_hidden), draft)  # over [B, T]
    pad = lambda x, k: jnp.pad(x[:, k:], ((0, 0), (0, k - 1)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731

    hidden = draft.project(batch.aux[:, :r])
    ks, vs, metrics, correct_all, step1 = [], [], {}, [], None
    eye = jnp.eye(r, dtype=bool)[None]
    causal = (pos[None, :] <= pos[:, None])[None] & row_ok[:, None, :]
    total = 0.0
    for k in range(1, cfg.ttt_steps + 1):
        tokens_k = pad(batch.tokens, k)  # x[j+k]
        if ks:
            ctx_k, ctx_v = jnp.concatenate(ks, 1), jnp.concatenate(vs, 1)
            ctx_mask = jnp.concatenate([causal] + [jnp.broadcast_to(eye, (b, r, r))] * (k - 2),
                                       2)
            self_mask = jnp.broadcast_to(eye, (b, r, r))
        else:
            kv_shape = (b, 0, draft.cfg.num_kv_heads, draft.cfg.head_dim)
            ctx_k = ctx_v = jnp.zeros(kv_shape, hidden.dtype)
            ctx_mask, self_mask = jnp.zeros((b, r, 0), bool), causal
        logits, h, kk, vv = draft.masked_step(
            embed_VxH[tokens_k], hidden, jnp.broadcast_to(pos + k - 1, (b, r)), ctx_k, ctx_v,
            ctx_mask, self_mask)
        if k == 1:
            step1 = (kk, vv, h)
        ks.append(kk)
        vs.append(vv)
        hidden = h
        mask = row_ok & (pos[None] + k < batch.length[:, None])  # target at position j+k known
        loss, acc, correct, oov = _term(logits, tuple(pad(x, k) for x in targets), mask,
                                        draft, cfg)
        total = total + cfg.step_weight ** (k - 1) * loss
        metrics[f"ttt_loss_{k}"] = loss
        metrics[f"acc_{k}"] = acc
        correct_all.append(correct & mask)
        if k == 1:
            metrics["out_of_vocab"] = oov
    # Simulated greedy chain acceptance: 1 + the run of correct steps from each root row.
    run = jnp.cumprod(jnp.stack(correct_all, -1).astype(jnp.int32), -1).sum(-1)
    metrics["sim_acceptance_length"] = 1.0 + _masked_mean(run, row_ok)
    metrics["ttt_loss"] = total
    return total, metrics, step1


def discard_loss(draft, embed_VxH, target_logits_fn, batch: LearnBatch, step1, cfg: LossConfig):
    """The rejected-node term. Returns (loss, metrics)."""
    k1, v1, h1 = step1  # committed rows' step-1 keys/values [B, R, K, D] and outputs [B, R, H]
    b, s, n1 = batch.tree_tokens.shape
    r = k1.shape[1]
    q_rows = s * n1
    anc = ancestor_mask(batch.tree_parent.reshape(b * s, n1)).reshape(b, s, n1, n1)
    depth = anc.sum(-1) - 1  # [B, S, N1]
    same_tree = jnp.eye(s, dtype=bool)[None, :, None, :, None]
    self_mask = (same_tree & anc[:, :, :, None, :]).reshape(b, q_rows, q_rows)
    # The root's row is a committed row (in the context), so tree slot 0 is never a key.
    self_mask = self_mask & (jnp.arange(q_rows) % n1 != 0)[None, None]
    root_row = jnp.clip(batch.tree_root_pos - 1, 0, r - 1)  # [B, S] draft row of each root
    ctx_mask = (jnp.arange(r)[None, None] <= root_row.reshape(b, s, 1))  # [B, S, R]
    ctx_mask = jnp.repeat(ctx_mask, n1, axis=1)  # [B, Q, R]
    root_h = jnp.take_along_axis(h1, root_row[..., None], 1)  # [B, S, H]
    parent = jnp.maximum(batch.tree_parent, 0)
    tokens = batch.tree_tokens.reshape(b, q_rows)
    positions = (root_row[..., None] + depth).reshape(b, q_rows)
    embeds = embed_VxH[tokens]
    out_h = jnp.broadcast_to(root_h[:, :, None], (b, s, n1, h1.shape[-1]))
    logits = None
    for _ in range(cfg.tree_depth):
        parent_h = jnp.take_along_axis(out_h, parent[..., None], 2)
        hidden_in = jnp.where((batch.tree_parent <= 0)[..., None], root_h[:, :, None], parent_h)
        logits, h, _, _ = draft.masked_step(embeds, hidden_in.reshape(b, q_rows, -1), positions,
                                            k1, v1, ctx_mask, self_mask)
        out_h = h.reshape(b, s, n1, -1)
    rejected = (batch.tree_valid[..., None] & ~batch.tree_accepted & (depth >= 1)
                & (depth <= cfg.tree_depth)).reshape(b, q_rows)
    targets = _targets(target_logits_fn(batch.tree_hidden.reshape(b, q_rows, -1)), draft)
    loss, acc, _, _ = _term(logits, targets, rejected, draft, cfg)
    return loss, {"discard_loss": loss, "discard_acc": acc,
                  "rejected_nodes": jnp.sum(rejected).astype(jnp.float32)}


def draft_loss(draft, embed_VxH, target_logits_fn, batch: LearnBatch, cfg: LossConfig):
    """The whole objective: (loss, metrics)."""
    loss, metrics, step1 = ttt_loss(draft, embed_VxH, target_logits_fn, batch, cfg)
    if cfg.lambda_discard:
        d_loss, d_metrics = discard_loss(draft, embed_VxH, target_logits_fn, batch, step1, cfg)
        loss = loss + cfg.lambda_discard * d_loss
        metrics.update(d_metrics)
    metrics["loss"] = loss
    return loss, metrics

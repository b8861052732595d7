"""The draft's training objective, from committed sequences and from rejected tree nodes.

    L = sum_k w^(k-1) E_committed[ KL(p_target || q_draft at TTT step k) ]
        + lambda_discard * E_rejected nodes[ l_node ]      (l_node: see learn/discard.py)
        (+ tv_weight * the same weighted sum of total variation, if asked)

lambda_discard defaults to 0: on SmolLM2 no rejected-node variant learned faster per
learner-second than the first term alone (docs/objectives.md).

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
verification already computed the target's distribution there. Its variants (KL, total
variation, unlikelihood; all nodes or the frontier; weightings; a warm-up; tree subsampling)
live in learn/discard.py.

An optional extra total-variation term on the committed positions (`tv_weight`) is one minus
the acceptance probability of speculative sampling (Leviathan et al. 2023).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from aurora_jax.errors import ConfigError
from aurora_jax.learn.discard import TTTWork, discard_term
from aurora_jax.learn.divergence import draft_vocab_target, kl, masked_mean, total_variation

DiscardObjective = Literal["kl", "tv", "unlikelihood"]
DiscardNodes = Literal["all", "frontier"]
DiscardWeight = Literal["uniform", "depth", "draft_prob"]
DISCARD_OBJECTIVES = typing.get_args(DiscardObjective)
DISCARD_NODES = typing.get_args(DiscardNodes)
DISCARD_WEIGHTS = typing.get_args(DiscardWeight)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which terms the draft objective has and how they weigh."""

    ttt_steps: int = 5
    """K: training-time-test unroll length."""
    step_weight: float = 0.8
    """w: step k of the unroll weighs w^(k-1)."""
    lambda_discard: float = 0.0
    """Weight of the rejected-node term (0, the default: the plain EAGLE-3 loss, which learned
    fastest per learner-second in every scenario measured on SmolLM2; docs/objectives.md)."""
    discard: DiscardObjective = "unlikelihood"
    """The rejected-node objective: kl (target vs draft at the node; the paper's), tv (total
    variation there: the rejection probability of speculative sampling) or unlikelihood
    (lower the rejected token's draft probability at its parent where it exceeds the
    target's; the best-measured variant, hence the default once lambda_discard > 0)."""
    discard_nodes: DiscardNodes = "frontier"
    """all rejected nodes (a draft pass per depth) or frontier (rejected children of accepted
    nodes, computed from the TTT unroll's work)."""
    discard_weight: DiscardWeight = "uniform"
    """Node weights, normalised to mean 1: uniform, depth (step_weight^(depth-1)) or
    draft_prob (the draft's probability of the rejected token)."""
    discard_warmup: int = 0
    """Learner steps over which lambda_discard ramps up linearly from 0."""
    discard_trees: int = 0
    """> 0: the term uses this many random trees per sequence, inverse-probability weighted
    (unbiased, cheaper); 0: all trees."""
    tv_weight: float = 0.0
    """Weight of an extra total-variation term on the committed positions."""
    tree_depth: int = 8
    """Deepest tree node the all-nodes term reaches (one draft pass per depth)."""

    def __post_init__(self):
        if self.ttt_steps < 1:
            raise ConfigError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if not 0 < self.step_weight <= 1:
            raise ConfigError(f"step_weight must be in (0, 1], got {self.step_weight}")
        if self.lambda_discard < 0 or self.tv_weight < 0:
            raise ConfigError("lambda_discard and tv_weight must be >= 0")
        if self.tree_depth < 1:
            raise ConfigError(f"tree_depth must be >= 1, got {self.tree_depth}")
        if self.discard_warmup < 0 or self.discard_trees < 0:
            raise ConfigError("discard_warmup and discard_trees must be >= 0")
        for name, allowed in (("discard", DISCARD_OBJECTIVES), ("discard_nodes", DISCARD_NODES),
                              ("discard_weight", DISCARD_WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got "
                                  f"{getattr(self, name)!r}")


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
    loss = masked_mean(kl(p_d, logq), mask & in_vocab)
    if cfg.tv_weight:
        loss = loss + cfg.tv_weight * masked_mean(
            total_variation(p, jnp.exp(logq), d2t), mask)
    correct = draft.to_target_ids(jnp.argmax(logits_q, -1)) == argmax
    return loss, masked_mean(correct, mask), correct, masked_mean(~in_vocab, mask)


def ttt_loss(draft, embed_VxH, target_logits_fn, batch: LearnBatch, cfg: LossConfig):
    """The committed-sequence term. Returns (loss, metrics, every step's keys, values, hidden
    states and logits for the discard term)."""
    b, t = batch.tokens.shape
    r = t - 1  # rows: row j reads x[j+1]
    pos = jnp.arange(r)
    row_ok = pos[None] + 1 < batch.length[:, None]  # [B, R]
    targets = _targets(target_logits_fn(batch.target_hidden), draft)  # over [B, T]
    pad = lambda x, k: jnp.pad(x[:, k:], ((0, 0), (0, k - 1)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731

    hidden = draft.project(batch.aux[:, :r])
    ks: list = []
    vs: list = []
    hs: list = []
    ls: list = []
    metrics: dict = {}
    correct_all: list = []
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
        ks.append(kk)
        vs.append(vv)
        hs.append(h)
        ls.append(logits)
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
    metrics["sim_acceptance_length"] = 1.0 + masked_mean(run, row_ok)
    metrics["ttt_loss"] = total
    return total, metrics, TTTWork(ks, vs, hs, ls)


def discard_scale(cfg: LossConfig, step):
    """lambda_discard at learner step `step` (the warm-up ramps it from 0)."""
    if not cfg.discard_warmup:
        return jnp.float32(cfg.lambda_discard)
    ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / cfg.discard_warmup)
    return cfg.lambda_discard * ramp


def draft_loss(draft, embed_VxH, target_logits_fn, batch: LearnBatch, cfg: LossConfig,
               step=0):
    """The whole objective at learner step `step` (for the warm-up and the tree subsample's
    draw): (loss, metrics)."""
    loss, metrics, work = ttt_loss(draft, embed_VxH, target_logits_fn, batch, cfg)
    if cfg.lambda_discard:
        key = jax.random.fold_in(jax.random.key(0), step)
        d_loss, d_metrics = discard_term(draft, embed_VxH, target_logits_fn, batch, work, cfg,
                                         key)
        scale = discard_scale(cfg, step)
        loss = loss + scale * d_loss
        metrics.update(d_metrics, discard_lambda=scale)
    metrics["loss"] = loss
    return loss, metrics

"""Divergences between the target's distribution and the draft's reduced-vocabulary one, and
the masked mean every term of the objective averages them with."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def masked_mean(x, mask):
    """Mean of x over mask's true entries (0 when there are none)."""
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

"""Next-token training of the target decoder: model init, loss, and the jitted train and eval
steps.

`aurora-jax prepare --recipe tiny` uses it to train the small built-in target from scratch
on CPU (aurora_jax/builtin/tiny.py) through the resumable loop of learn/fit.py. The model is
split once (`graphdef`, trainable `params`, non-trainable `buffers` such as the RoPE
frequencies); the step is a pure jitted function of an explicit `TrainState` that it donates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aurora_jax.learn.fit import TrainState
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.transformer import Transformer


def init_model(cfg: TargetConfig, seed: int, tx: optax.GradientTransformation):
    """A fresh model, split: (graphdef, buffers, TrainState)."""
    graphdef, params, buffers = nnx.split(  # type: ignore[misc]  # exactly two filters
        Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return graphdef, buffers, state


def token_losses(graphdef, params, buffers, tokens_BxT1):
    """Next-token cross-entropy [B, T] of windows of T + 1 tokens (causal, positions 0..T-1)."""
    inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    b, t = inputs_BxT.shape
    model = nnx.merge(graphdef, params, buffers)
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden_BxTxH, _, _ = model.hidden(inputs_BxT, positions_BxT,
                                      causal_mask(jnp.full((b,), t, jnp.int32), t))
    logits_BxTxV = model.logits(hidden_BxTxH)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """jit((state, buffers, batch [B, T+1]) -> (state, metrics)); the state is donated."""

    def loss_fn(params, buffers, batch):
        return token_losses(graphdef, params, buffers, batch).mean()

    def step(state: TrainState, buffers, batch_BxT1):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, buffers, batch_BxT1)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef):
    """jit((params, buffers, batch [B, T+1]) -> mean loss per row [B])."""
    return jax.jit(lambda p, b, x: token_losses(graphdef, p, b, x).mean(axis=1))


def mean_loss(eval_step, params, buffers, batches: list[tuple[np.ndarray, int]]) -> float | None:
    """Mean next-token loss over (batch, valid rows) pairs; None when there is nothing to score."""
    rows = [np.asarray(eval_step(params, buffers, x))[:n] for x, n in batches]
    return float(np.concatenate(rows).mean()) if rows else None

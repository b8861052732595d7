"""Next-token pre-training of the target decoder: loss, optimizer, jitted step, resumable loop.

`aurora-jax prepare` uses it to train the built-in target from scratch on CPU. The model is
split once (`graphdef`, trainable `params`, non-trainable `buffers` such as the RoPE
frequencies); the step is a pure jitted function of an explicit `TrainState` that it donates.
The loop saves orbax checkpoints of the train state together with the grain iterator's
position and the loss history, so an interrupted run resumes where it stopped and sees the same
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.transformer import Transformer


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes."""

    step: jax.Array
    """Scalar int32: optimizer steps taken."""
    params: nnx.State
    """Trainable weights (the model's nnx.Param leaves)."""
    opt_state: optax.OptState
    """AdamW moments and schedule count."""


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with global-norm clipping and a linear-warmup cosine schedule."""

    learning_rate: float
    """Peak learning rate, reached after warmup."""
    warmup_steps: int
    """Steps of linear warmup from 0."""
    total_steps: int
    """Length of the cosine decay (warmup included)."""
    min_lr_ratio: float
    """Final learning rate as a fraction of the peak."""
    weight_decay: float
    """Decoupled weight decay, applied to matrices only (not to norm weights)."""
    grad_clip: float
    """Global gradient-norm clipping threshold."""


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=s.learning_rate, warmup_steps=s.warmup_steps,
        decay_steps=max(s.total_steps, s.warmup_steps + 1),
        end_value=s.learning_rate * s.min_lr_ratio)
    # b2=0.95: the usual LM setting; a short run has no time to wait for a slow second moment.
    return optax.chain(
        optax.clip_by_global_norm(s.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=s.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def init_model(cfg: TargetConfig, seed: int, tx: optax.GradientTransformation):
    """A fresh model, split: (graphdef, buffers, TrainState)."""
    graphdef, params, buffers = nnx.split(
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


# ------------------------------------------------------------------ checkpointed training loop
@dataclasses.dataclass
class FitResult:
    """What a (possibly resumed) training run did."""

    state: TrainState
    """The final train state."""
    start_step: int
    """Step this run started from (> 0 when it resumed from a checkpoint)."""
    losses: list[float]
    """Training loss of every step since step 0, restored history included."""
    seconds: float
    """Wall-clock seconds of this run's loop, compilation included."""
    stopped_by_time: bool
    """The time budget ran out before `total_steps`."""


def _manager(ckpt_dir: Path) -> ocp.CheckpointManager:
    # Synchronous saves: the next step donates the state, so its buffers must not be read by a
    # background writer after save() returns.
    return ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False))


def _save(mgr, state: TrainState, iterator, losses: list[float]) -> None:
    step = int(state.step)
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(iterator.get_state()),
        history=ocp.args.JsonSave({"losses": losses[:step]})), force=True)
    mgr.wait_until_finished()


def _restore(mgr, state: TrainState, iterator) -> tuple[TrainState, list[float]]:
    step = mgr.latest_step()
    got = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore(),
        history=ocp.args.JsonRestore()))
    iterator.set_state(got["data"])
    return got["state"], list(got["history"]["losses"])


def fit(state: TrainState, buffers, train_step, iterator, *, total_steps: int,
        ckpt_dir: str | Path, checkpoint_every: int, time_budget_s: float,
        tokens_per_step: int, progress: bool = True,
        on_step: Callable[[int, float], None] | None = None) -> FitResult:
    """Trains to `total_steps` (or until `time_budget_s`), resuming from `ckpt_dir` if it holds
    a checkpoint; saves every `checkpoint_every` steps, at the end and on Ctrl-C.

    `on_step(step, loss)` is called for every finished step, one step late: the host reads a
    step's loss while the next step runs, so the loop never waits on the device.
    """
    mgr = _manager(Path(ckpt_dir))
    losses: list[float] = []
    if mgr.latest_step() is not None:
        state, losses = _restore(mgr, state, iterator)
    start = int(state.step)
    t0 = time.monotonic()
    bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step",
               desc="training", dynamic_ncols=True)
    first_done = [None]  # (time, step) of the first finished step: tokens/s leaves out compiling

    def record(step, metrics, notify=True):
        loss = float(metrics["loss"])
        losses[step - 1:] = [loss]
        now = time.monotonic()
        if first_done[0] is None:
            first_done[0] = (now, step)
        t, s = first_done[0]
        rate = (step - s) * tokens_per_step / (now - t) if now > t else 0.0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(step - bar.n)
        if notify and on_step is not None:
            on_step(step, loss)

    step, pending = start, None  # pending: (step, metrics) dispatched but not yet read back
    stopped_by_time = False
    try:
        while step < total_steps:
            state, metrics = train_step(state, buffers, next(iterator))
            step += 1
            if pending is not None:
                record(*pending)
            pending = (step, metrics)
            stopped_by_time = time.monotonic() - t0 > time_budget_s
            if step % checkpoint_every == 0 or step == total_steps or stopped_by_time:
                record(*pending)
                pending = None
                _save(mgr, state, iterator, losses)
            if stopped_by_time:
                break
    except KeyboardInterrupt:
        # Keep what was trained. Best effort: an interrupt inside the step itself leaves a
        # donated (deleted) state behind, and then the last periodic checkpoint stands.
        try:
            if pending is not None:
                record(*pending, notify=False)
            _save(mgr, state, iterator, losses)
        except Exception:  # noqa: BLE001 - the interrupt is what the user must see
            pass
        raise
    finally:
        bar.close()
        mgr.close()
    return FitResult(state=state, start_step=start, losses=losses,
                     seconds=time.monotonic() - t0, stopped_by_time=stopped_by_time)


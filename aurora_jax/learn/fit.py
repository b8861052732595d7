"""A resumable training loop: a jitted step over an explicit `TrainState`, checkpointed.

Used by `train-draft` (learn/offline.py) and by `prepare --recipe tiny`, which pretrains the
small built-in target (builtin/train_target.py). The loop saves orbax checkpoints of the train
state together with the grain iterator's position and the loss history, so an interrupted run
resumes where it stopped and sees the same batches it would have seen. The host reads each
step's loss one step late, so the loop never waits on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import flax.struct
import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from aurora_jax import interrupt


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes."""

    step: jax.Array
    """Scalar int32: optimizer steps taken."""
    params: nnx.State
    """Trainable weights (the model's nnx.Param leaves)."""
    opt_state: optax.OptState
    """AdamW moments and schedule count."""


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


def _kept(mgr, ckpt_dir) -> str:
    """What an interrupted run leaves, for the Ctrl-C line."""
    step = mgr.latest_step()
    if step is None:
        return "nothing kept: no checkpoint was written yet"
    return f"kept the checkpoint of step {step} in {ckpt_dir} (training resumes from it)"


def fit(state: TrainState, buffers, train_step, iterator, *, total_steps: int,
        ckpt_dir: str | Path, checkpoint_every: int, time_budget_s: float,
        tokens_per_step: int, progress: bool = True,
        on_step: Callable[[int, float], None] | None = None) -> FitResult:
    """Trains to `total_steps` (or until `time_budget_s`), resuming from `ckpt_dir` if it holds
    a checkpoint; saves every `checkpoint_every` steps, at the end and on Ctrl-C. Under the
    CLI (interrupt.py) Ctrl-C stops it between two steps and raises `Interrupted` saying
    which checkpoint it kept.

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
        # The CLI's Ctrl-C (interrupt.py) stops the loop between two steps, never inside one.
        with interrupt.deferred():
            while step < total_steps:
                interrupt.check()
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
    except KeyboardInterrupt as e:
        # Keep what was trained. Best effort: a KeyboardInterrupt raised inside the step
        # itself (not the CLI's) leaves a donated (deleted) state behind, and then the last
        # periodic checkpoint stands.
        try:
            if pending is not None:
                record(*pending, notify=False)
            _save(mgr, state, iterator, losses)
        except Exception:  # noqa: BLE001 - the interrupt is what the user must see
            pass
        if isinstance(e, interrupt.Interrupted):
            raise interrupt.Interrupted(_kept(mgr, ckpt_dir)) from None
        raise
    finally:
        bar.close()
        mgr.close()
    return FitResult(state=state, start_step=start, losses=losses,
                     seconds=time.monotonic() - t0, stopped_by_time=stopped_by_time)


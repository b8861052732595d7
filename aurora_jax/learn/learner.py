"""The draft learner: a jitted `learner_step(state, batch) -> (state, metrics)` and publishing.

The draft is split into trainable params (nnx.Param) and buffers (d2t, t2d, RoPE frequencies);
the target's embedding and lm_head are frozen inputs (the draft reads the target's embedding;
the target's distribution comes from its lm_head over recorded final hidden states). The step
donates the learner's own state. Published drafts are copies, so the engine never holds a
buffer a later step deletes (DESIGN.md: an optax update that donates params would delete
buffers the engine may still hold). Given a mesh of its own (learn/placement.py), the learner
keeps all of this on those devices, copied there once, and places every batch there.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from aurora_jax.learn import placement
from aurora_jax.learn.losses import LearnBatch, LossConfig, draft_loss
from aurora_jax.learn.optimizer import OptimizerSettings, make_optimizer
from aurora_jax.learn.vocab_refresh import VocabChange, remap_learner
from aurora_jax.models.eagle3 import Draft
from aurora_jax.models.sharding import move_tree
from aurora_jax.models.transformer import Target


@flax.struct.dataclass
class LearnerState:
    step: jax.Array  # scalar int32
    params: nnx.State  # the draft's trainable weights
    opt_state: optax.OptState


DEFAULT_OPTIMIZER = OptimizerSettings()


def target_head(target: Target):
    """The frozen arrays the learner needs from the target: (embedding [V, H], lm_head
    kernel [H, V])."""
    return target.state["embed"][...], target.head_kernel()


def make_learner_step(graphdef, tx: optax.GradientTransformation, cfg: LossConfig):
    """jit((state, buffers, embed, head, batch) -> (state, metrics)); the state is donated."""
    return jax.jit(learner_step_fn(graphdef, tx, cfg), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _shared_step(graphdef, optimizer: OptimizerSettings, cfg: LossConfig):
    """(optimizer, jitted step) shared by every Learner of one draft structure, optimizer and
    objective: a second learner (another seed, another start draft) reuses the compiled
    program instead of compiling its own."""
    tx = make_optimizer(optimizer)
    return tx, make_learner_step(graphdef, tx, cfg)


def learner_step_fn(graphdef, tx: optax.GradientTransformation, cfg: LossConfig):
    """The un-jitted learner step, for composing into bigger jitted steps."""

    def loss_fn(params, buffers, embed, head, batch, step):
        draft = nnx.merge(graphdef, params, buffers)
        return draft_loss(draft, embed, lambda h: (h @ head).astype(jnp.float32), batch, cfg,
                          step)

    def step(state: LearnerState, buffers, embed, head, batch: LearnBatch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, buffers, embed, head, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return LearnerState(state.step + 1, optax.apply_updates(state.params, updates),
                            opt_state), metrics

    return step


@dataclasses.dataclass
class Learner:
    """Owns a draft's training state; `step(batch)` trains, `publish()` hands out a copy."""

    draft: Draft
    target: Target
    loss: LossConfig = LossConfig()
    optimizer: OptimizerSettings = DEFAULT_OPTIMIZER
    mesh: Mesh | None = None
    """Devices of the learner's own, apart from the target's (learn/placement.py): its state
    and the target's embedding and lm_head live there, replicated, and batches are split over
    their dp axis; None: wherever the draft and the target are."""

    def __post_init__(self):
        if self.mesh is not None:
            placement.check_apart(self.mesh, self.target.mesh)
        model = nnx.merge(self.draft.graphdef, self.draft.state)
        # graphdef, buffers (d2t, t2d, RoPE) and the target's frozen embed/head are public:
        # the offline trainer and the online learner build their own jitted calls on them.
        self.graphdef, params, self.buffers = nnx.split(model, nnx.Param, ...)
        params, self.buffers = self.place((params, self.buffers))
        tx, self._step = _shared_step(self.graphdef, self.optimizer, self.loss)
        # Built by a jitted function: fresh buffers (never aliasing the serving draft's, which
        # the step will donate) typed and placed exactly like the states the step returns,
        # so the second step does not compile again.
        self._init = jax.jit(lambda p, step: LearnerState(step, jax.tree.map(jnp.copy, p),
                                                          tx.init(p)))
        self.state = self._init(params, jnp.zeros((), jnp.int32))
        self.embed, self.head = self.place(target_head(self.target))  # frozen: copied once

    def place(self, tree):
        """`tree` (say a draft state the engine serves) on the learner's devices, replicated,
        copied device to device; as it is without a mesh of the learner's own."""
        if self.mesh is None:
            return tree
        return move_tree(tree, placement.replicated(self.mesh))

    def batch_sharding(self, batch_size: int) -> jax.sharding.Sharding | None:
        """Where a batch of `batch_size` sequences goes (None: the default device)."""
        return None if self.mesh is None else placement.batch_sharding(self.mesh, batch_size)

    def step(self, batch: LearnBatch) -> dict:
        sharding = self.batch_sharding(batch.tokens.shape[0])
        if sharding is not None:  # a no-op for a batch the trace buffer placed already
            batch = jax.device_put(batch, sharding)
        self.state, metrics = self._step(self.state, self.buffers, self.embed, self.head,
                                         batch)
        return metrics

    def set_vocab(self, new_ids) -> VocabChange:
        """Moves the draft to the vocabulary `new_ids` (sorted target ids, same size): see
        learn/vocab_refresh.py. Shapes stay, so neither the step nor the engine recompiles."""
        self.state, self.buffers, change = remap_learner(self.state, self.buffers, self.head,
                                                         np.asarray(new_ids, np.int64))
        return change

    def reset_to(self, draft_state: nnx.State) -> None:
        """Trains on from `draft_state` (shaped like `publish()`'s: say a draft the engine
        rolled back to) with fresh optimizer moments, the step count kept (the schedule goes
        on); the moments of the trajectory being abandoned go with it."""
        model = nnx.merge(self.draft.graphdef, self.place(draft_state))
        _, params, self.buffers = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        self.state = self._init(params, self.state.step)

    def publish(self) -> nnx.State:
        """A copy of the current draft state, shaped like the serving draft's (for
        `Engine.set_draft`)."""
        params = jax.tree.map(jnp.copy, self.state.params)
        return nnx.split(nnx.merge(self.graphdef, params, self.buffers))[1]

"""The optimizer every trainer here uses: AdamW with global-norm clipping and a linear-warmup
cosine schedule (the online learner, `train-draft`, and the built-in target's pretraining)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from aurora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with global-norm clipping and a linear-warmup cosine schedule."""

    learning_rate: float = 1e-3
    """Peak learning rate, reached after warmup."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0."""
    total_steps: int = 100_000
    """Length of the cosine decay (warmup included)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not to norm weights)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold."""

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError("warmup_steps must be >= 0 and total_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0")


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

"""Token sampling: temperature, top-k and top-p (nucleus, Holtzman et al. 2020) per row.

Settings are arrays with one entry per sequence, so one compiled step serves a batch whose
requests sample differently. Temperature 0 means greedy. The same filtered distribution is
what speculative sampling compares draft and target under (Leviathan et al. 2023), so the
filtering lives in one function, `filtered_logprobs`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.errors import ConfigError

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token."""

    temperature: float = 0.0
    """0 is greedy decoding; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


def stack_params(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row arrays {'temperature': [B], 'top_p': [B], 'top_k': [B]}."""
    return {
        "temperature": np.array([p.temperature for p in params], np.float32),
        "top_p": np.array([p.top_p for p in params], np.float32),
        "top_k": np.array([p.top_k for p in params], np.int32),
    }


def filtered_logprobs(logits_BxV, temperature_B, top_p_B, top_k_B):
    """Log-probabilities [B, V] after temperature, top-k then top-p (the order transformers
    uses); filtered-out tokens get a very negative value. Greedy rows (temperature 0) are
    returned at temperature 1 and are meant for argmax."""
    v = logits_BxV.shape[-1]
    t = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    x = logits_BxV.astype(jnp.float32) / t
    sorted_BxV = jnp.sort(x, axis=-1)[:, ::-1]
    k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
    kth_B = jnp.take_along_axis(sorted_BxV, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth_B, _NEG, x)
    # Nucleus: a token survives if the mass of the strictly more likely tokens is < top_p.
    sorted_BxV = jnp.where(jnp.arange(v)[None] < k[:, None], sorted_BxV, _NEG)
    probs_sorted = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = mass_before < top_p_B[:, None]
    # The smallest kept logit is the threshold (ties at the threshold are kept).
    threshold_B = jnp.min(jnp.where(keep_sorted, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < threshold_B, _NEG, x)
    return jax.nn.log_softmax(x, axis=-1)


def sample(key, logits_BxV, temperature_B, top_p_B, top_k_B):
    """Next token per row [B] int32: argmax where temperature is 0, else a filtered sample."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw():
        logp = filtered_logprobs(logits_BxV, temperature_B, top_p_B, top_k_B)
        drawn = jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
        return jnp.where(temperature_B > 0, drawn, greedy_B)

    # The vocabulary sort costs more than a small model's decode step; skip it when all
    # rows are greedy.
    return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda: greedy_B)

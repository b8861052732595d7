"""Token sampling: temperature, top-k and top-p (nucleus, Holtzman et al. 2020) per row.

A request's settings are a `SamplingParams`; on the device a batch's settings travel as one
`SamplingRows` (one entry per row), so one compiled step serves a batch whose requests sample
differently. Temperature 0 means greedy. Target-only decoding samples with `sample`;
speculative sampling (speculative/accept.py, Leviathan et al. 2023) compares draft and target
under the same filtered distribution, so the filtering lives in one function,
`filtered_logprobs`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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
    seed: int | None = None
    """Seeds this request's draws: the same seed, settings and prompt give the same tokens
    whatever else shares the batch (with the same speculation setting). None: the engine's
    own random stream."""

    def __post_init__(self):
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


@struct.dataclass
class SamplingRows:
    """Per-row sampling settings of a batch, as device arrays (a pytree)."""

    # Device arrays inside a step; numpy from `stack`, on the host.
    temperature: jax.Array | np.ndarray  # [B] float32, 0 = greedy
    top_p: jax.Array | np.ndarray  # [B] float32
    top_k: jax.Array | np.ndarray  # [B] int32, 0 = no top-k
    seed: jax.Array | np.ndarray  # [B] int32, -1 = none (the step's key)

    @classmethod
    def stack(cls, params: list[SamplingParams], rows: int | None = None) -> SamplingRows:
        """One row per setting, padded with greedy rows up to `rows`."""
        params = list(params) + [SamplingParams()] * ((rows or len(params)) - len(params))
        return cls(temperature=np.array([p.temperature for p in params], np.float32),
                   top_p=np.array([p.top_p for p in params], np.float32),
                   top_k=np.array([p.top_k for p in params], np.int32),
                   seed=np.array([-1 if p.seed is None else p.seed for p in params], np.int32))

    @property
    def sampled(self) -> jax.Array | np.ndarray:
        """[B] bool: the rows that sample (temperature > 0)."""
        return self.temperature > 0

    def keys(self, key: jax.Array, position_B: jax.Array | None = None) -> jax.Array:
        """One PRNG key per row [B]. A seeded row's key depends only on its seed and
        `position_B` (tokens the row has generated), so its draws never depend on its batch
        neighbours; the other rows' keys are the step's `key` folded with the row index."""
        b = self.seed.shape[0]
        position_B = jnp.zeros((b,), jnp.int32) if position_B is None else position_B
        shared = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
        own = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(
            jnp.maximum(jnp.asarray(self.seed), 0), position_B)
        data_s, data_o = jax.random.key_data(shared), jax.random.key_data(own)
        pick = (jnp.asarray(self.seed) >= 0).reshape((b,) + (1,) * (data_s.ndim - 1))
        return jax.random.wrap_key_data(jnp.where(pick, data_o, data_s))

    def repeat(self, n: int) -> SamplingRows:
        """Each row's settings n times in a row ([B] -> [B * n]), for n positions per row."""
        return jax.tree.map(lambda x: jnp.repeat(x, n), self)


def filtered_logprobs(logits_BxV, rows: SamplingRows):
    """Log-probabilities [B, V] after temperature, top-k then top-p (the order transformers
    uses); filtered-out tokens get a very negative value. Greedy rows (temperature 0) are
    returned at temperature 1 and are meant for argmax."""
    temperature_B, top_p_B, top_k_B = rows.temperature, rows.top_p, rows.top_k
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


def sample(key, logits_BxV, rows: SamplingRows, position_B=None):
    """Next token per row [B] int32: argmax where temperature is 0, else a filtered sample
    drawn with the row's key (`SamplingRows.keys`; `position_B`: tokens generated so far)."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw():
        logp = filtered_logprobs(logits_BxV, rows)
        keys_B = rows.keys(key, position_B)
        drawn = jax.vmap(jax.random.categorical)(keys_B, logp).astype(jnp.int32)
        return jnp.where(rows.sampled, drawn, greedy_B)

    # The vocabulary sort costs more than a small model's decode step; skip it when all
    # rows are greedy.
    return jax.lax.cond(jnp.any(rows.sampled), draw, lambda: greedy_B)

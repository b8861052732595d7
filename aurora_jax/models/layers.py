"""Small building blocks of the decoder: linear, RMSNorm, rotary embeddings.

Axis vocabulary used across aurora_jax: B batch, T new tokens, S cache length, N tree nodes,
H hidden, F MLP width, V vocab, K kv heads, G query heads per kv head, D head dim, L layers.
Parameter layouts follow x @ W (kernel [in, out]); Hugging Face stores [out, in].
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.models.config import RopeScaling


def matmul_f32(x, w):
    """x @ w accumulated and returned in float32, whatever the operands' dtype. For logits:
    a bfloat16 result keeps 8 bits of mantissa, which rounds close candidates to ties and
    makes the greedy choice depend on how a step was batched."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


class Linear(nnx.Module):
    """y = x @ kernel, no bias (Llama and Qwen3 projections have none)."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        init = jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * std
        self.kernel = nnx.Param(init.astype(dtype))

    def __call__(self, x):
        return x @ self.kernel[...]

    def logits(self, x):
        """x @ kernel in float32 (see matmul_f32): the output head's form."""
        return matmul_f32(x, self.kernel[...])


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and cast back before the weight, as Hugging Face does."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class RopeSettings(Protocol):
    """What RoPE reads from a model config (TargetConfig and DraftConfig both have it)."""

    @property
    def head_dim(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rope_scaling(self) -> RopeScaling | None: ...


def rope_inv_freq(cfg: RopeSettings) -> np.ndarray:
    """Inverse frequencies [D/2] in float32, with Llama-3.1 (`llama3`) or linear scaling."""
    d = cfg.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between is
    # interpolated smoothly (Llama 3.1 report, "RoPE scaling").
    old = np.float32(s.original_max_position_embeddings)
    low_wavelen = old / np.float32(s.low_freq_factor)
    high_wavelen = old / np.float32(s.high_freq_factor)
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old / wavelen - np.float32(s.low_freq_factor)) / np.float32(
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq_half: jax.Array, positions_BxT: jax.Array, dtype):
    """cos and sin tables [B, T, D] for per-token positions (non-interleaved halves)."""
    freqs_BxTxDh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_half[None, None, :]
    emb_BxTxD = jnp.concatenate([freqs_BxTxDh, freqs_BxTxDh], axis=-1)
    return jnp.cos(emb_BxTxD).astype(dtype), jnp.sin(emb_BxTxD).astype(dtype)


def apply_rope(x_BxTxKxD, cos_BxTxD, sin_BxTxD):
    """Rotates each head's two halves by the position angle (rotate-half convention)."""
    half = x_BxTxKxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxKxD[..., half:], x_BxTxKxD[..., :half]], axis=-1)
    return x_BxTxKxD * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]

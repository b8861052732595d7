"""Llama-3 / Qwen3 decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax NNX.

One forward serves every use: prefill of a right-padded batch, decoding of one or several
tokens per sequence at per-sequence positions against a KV cache, and tree verification.
The caller states what each new token may see with `block_mask` (see models/attention.py);
positions are explicit so tree nodes can share a depth. Besides the final normed hidden state,
the forward returns the outputs of the aux layers that EAGLE-3 drafts read
(Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of LLMs via Training-Time Test").

Use it split: `graphdef, state = nnx.split(model)` once, then jit plain functions of
(graphdef, state) such as `forward` below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from aurora_jax.models.attention import attend
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.kv_cache import KVBlock, KVCache, write_block
from aurora_jax.models.layers import (
    Linear,
    RMSNorm,
    apply_rope,
    matmul_f32,
    rope_cos_sin,
    rope_inv_freq,
)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE. `cfg` is any config with the head fields;
    `d_in` is the input width (the hidden size, or 2H in the EAGLE-3 draft layer)."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs, d_in: int | None = None,
                 qk_norm: bool = False):
        h, d = cfg.hidden_size, cfg.head_dim
        d_in = d_in or h
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.impl = cfg.attention
        self.q_proj = Linear(d_in, cfg.num_heads * d, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d_in, cfg.num_kv_heads * d, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d_in, cfg.num_kv_heads * d, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if qk_norm else None

    def project_qkv(self, x_BxTxH, cos, sin):
        """Rotated queries [B,T,Q,D], keys and values [B,T,K,D] of the new tokens."""
        b, t, _ = x_BxTxH.shape  # H here is the input width d_in
        q = self.q_proj(x_BxTxH).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_BxTxH).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BxTxH).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x_BxTxH, cos, sin, block_mask, k_cache, v_cache, cache_len,
                 write_at=None):
        """The new tokens' attention to the cache (slots < cache_len; None: no cache is read)
        and to each other under `block_mask`. Returns (output, the new keys and values, the
        caches). With `write_at` [B], the new keys and values are first written into the
        caches at slots write_at[b] + j and the written caches are returned (else the caches
        as given). Writing before reading lets XLA update a donated cache in place, the read
        following the write; a write after the read left XLA copying the whole cache to keep
        the read safe, twice per layer and step. The slots written lie at or past cache_len,
        so attention sees the new tokens as the new block only, never as cache."""
        q, k, v = self.project_qkv(x_BxTxH, cos, sin)
        if write_at is not None:
            k_cache, v_cache = write_block(k_cache, k, write_at), write_block(v_cache, v, write_at)
        read = cache_len is not None
        out = attend(q, k, v, block_mask, k_cache if read else None, v_cache if read else None,
                     cache_len if read else None, impl=self.impl)
        return self.o_proj(out.reshape(*out.shape[:2], -1)), k, v, k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU; `cfg` is any config with hidden_size and intermediate_size."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, h, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs, qk_norm=cfg.family == "qwen3")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, block_mask, k_cache, v_cache, cache_len, write_at=None):
        """(output, the new keys and values, the caches), as `Attention` returns them."""
        a, k, v, k_cache, v_cache = self.attn(self.input_layernorm(x), cos, sin, block_mask,
                                              k_cache, v_cache, cache_len, write_at)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v, k_cache, v_cache


class Transformer(nnx.Module):
    """The target decoder. Construct with random weights, or load with models.hf_io."""

    def __init__(self, cfg: TargetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)) * 0.02
             ).astype(dtype))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))  # a buffer, not trained

    def hidden(self, tokens_BxT, positions_BxT, block_mask_BxTxT, cache: KVCache | None = None,
               cache_len_B=None, *, write: bool = True):
        """Runs the decoder; returns (final normed hidden [B,T,H], aux [B,T,A,H], new cache).

        With a cache, the new tokens' keys/values are written at slots cache_len[b] + j;
        with `write=False` they are not, and a `KVBlock` of them comes back in the cache's
        place (tree verification: only the accepted path enters the cache, `commit_path`).
        A cache with cache_len None is taken as empty (prefill): nothing in it is attended to,
        which also keeps XLA from constant-folding attention over a freshly zeroed cache.
        """
        x = self.embed[...][tokens_BxT]
        cos, sin = rope_cos_sin(self.inv_freq[...], positions_BxT, x.dtype)
        aux_layers = self.cfg.resolved_aux_layers
        empty = cache_len_B is None
        if cache is not None and empty:
            cache_len_B = jnp.zeros(tokens_BxT.shape[:1], jnp.int32)
        read_len = None if cache is None or empty else cache_len_B
        write_at = None if cache is None or not write else cache_len_B
        aux, new_k, new_v = {}, [], []
        for i, layer in enumerate(self.layers):
            kc, vc = (None, None) if cache is None else (cache.k[i], cache.v[i])
            x, k, v, kc, vc = layer(x, cos, sin, block_mask_BxTxT, kc, vc, read_len, write_at)
            new_k.append(kc if write else k)
            new_v.append(vc if write else v)
            if i in aux_layers:
                aux[i] = x
        aux_BxTxAxH = jnp.stack([aux[i] for i in aux_layers], axis=2)
        kind = KVCache if write else KVBlock
        new_cache = None if cache is None else kind(k=tuple(new_k), v=tuple(new_v))
        return self.norm(x), aux_BxTxAxH, new_cache

    def logits(self, hidden_BxTxH):
        """Float32 logits [..., V] from final normed hidden states (accumulated in float32
        whatever the weights' dtype)."""
        if self.lm_head is None:
            return matmul_f32(hidden_BxTxH, self.embed[...].T)
        return self.lm_head.logits(hidden_BxTxH)


def forward(graphdef, state, tokens_BxT, positions_BxT, block_mask_BxTxT, cache=None,
            cache_len_B=None, write: bool = True):
    """Pure function over the split model: (logits [B,T,V], aux, final hidden, cache, or the
    new tokens' `KVBlock` with `write=False`; see `Transformer.hidden`)."""
    model = nnx.merge(graphdef, state)
    h, aux, cache = model.hidden(tokens_BxT, positions_BxT, block_mask_BxTxT, cache, cache_len_B,
                                 write=write)
    return model.logits(h), aux, h, cache


def init_random(cfg: TargetConfig, seed: int = 0, dtype=jnp.float32):
    """A randomly initialised target, split: (graphdef, state)."""
    return nnx.split(Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))


@dataclasses.dataclass
class Target:
    """A loaded target model, split for jit: `forward(graphdef, state, ...)`."""

    cfg: TargetConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: jax.sharding.Mesh
    dtype: str

    def head_kernel(self) -> jax.Array:
        """The lm_head as [H, V] (the embedding, transposed, when the two are tied)."""
        if self.cfg.tie_word_embeddings:
            return jnp.asarray(self.state["embed"][...]).T
        return jnp.asarray(self.state["lm_head"]["kernel"][...])

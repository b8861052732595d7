"""Attention of new tokens against a KV-cache prefix plus the new block under a mask.

This is the one attention entry point of the project. Its contract is the one tree
verification needs (SpecInfer, Miao et al. 2024; EAGLE-2, Li et al. 2024): query t of
sequence b sees every cached slot s < cache_len[b] (the committed prefix) and new token j
iff block_mask[b, t, j]. Causal prefill, multi-token decode and tree verification are all
this call with different block masks. The cache is read as it was before this step; the
caller writes the new keys/values afterwards.

The reference below is plain jnp; a Pallas kernel with the same signature replaces it on
accelerators (pallas_kernels/).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite, so that a query with no visible key yields zeros-weighted garbage, not NaN


def attend(q_BxTxQxD, k_new_BxTxKxD, v_new_BxTxKxD, block_mask_BxTxT,
           k_cache_BxSxKxD=None, v_cache_BxSxKxD=None, cache_len_B=None):
    """Grouped-query attention; softmax in float32; returns [B, T, Q, D] in q's dtype."""
    b, t, nq, d = q_BxTxQxD.shape
    nk = k_new_BxTxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxQxD.reshape(b, t, nk, nq // nk, d)
    scale = d ** -0.5
    f32 = jnp.float32

    s_new = jnp.einsum("btkgd,bjkd->bkgtj", q_BxTxKxGxD, k_new_BxTxKxD,
                       preferred_element_type=f32) * scale
    s_new = jnp.where(block_mask_BxTxT[:, None, None], s_new, _NEG)
    if k_cache_BxSxKxD is None:
        p = jax.nn.softmax(s_new, axis=-1)
        out = jnp.einsum("bkgtj,bjkd->btkgd", p.astype(v_new_BxTxKxD.dtype), v_new_BxTxKxD,
                         preferred_element_type=f32)
        return out.reshape(b, t, nq, d).astype(q_BxTxQxD.dtype)

    s_len = k_cache_BxSxKxD.shape[1]
    s_old = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_cache_BxSxKxD,
                       preferred_element_type=f32) * scale
    visible_BxS = jnp.arange(s_len)[None, :] < cache_len_B[:, None]
    s_old = jnp.where(visible_BxS[:, None, None, None, :], s_old, _NEG)
    p = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)
    p_old, p_new = p[..., :s_len], p[..., s_len:]
    out = jnp.einsum("bkgts,bskd->btkgd", p_old.astype(v_cache_BxSxKxD.dtype), v_cache_BxSxKxD,
                     preferred_element_type=f32)
    out = out + jnp.einsum("bkgtj,bjkd->btkgd", p_new.astype(v_new_BxTxKxD.dtype), v_new_BxTxKxD,
                           preferred_element_type=f32)
    return out.reshape(b, t, nq, d).astype(q_BxTxQxD.dtype)


def causal_mask(lengths_B, t: int):
    """Block mask [B, T, T]: causal, and keys beyond each sequence's length hidden."""
    idx = jnp.arange(t)
    causal_TxT = idx[None, :] <= idx[:, None]
    valid_BxT = idx[None, :] < lengths_B[:, None]
    return causal_TxT[None] & valid_BxT[:, None, :]

"""Attention of new tokens against a KV-cache prefix plus the new block under a mask.

`attend` is the one attention entry point of the models. Its contract is the one tree
verification needs (SpecInfer, Miao et al. 2024; EAGLE-2, Li et al. 2024): query t of
sequence b sees every cached slot s < cache_len[b] (the committed prefix) and new token j
iff block_mask[b, t, j]. Causal prefill, multi-token decode and tree verification are all
this call with different block masks. The cache is read as it was before this step; the
caller writes the new keys/values afterwards.

The work is done by pallas_kernels: a Pallas kernel on accelerators, its jnp reference
elsewhere, chosen by the model config's `attention` field (see pallas_kernels/dispatch.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.dispatch import attention


def attend(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
           k_cache_BxKxSxD=None, v_cache_BxKxSxD=None, cache_len_B=None, *,
           impl: str = "auto"):
    """Grouped-query attention; softmax in float32; returns [B, T, Q, D] in q's dtype."""
    return attention(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                     k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B, impl=impl)


def causal_mask(lengths_B, t: int):
    """Block mask [B, T, T]: causal, and keys beyond each sequence's length hidden."""
    idx = jnp.arange(t)
    causal_TxT = idx[None, :] <= idx[:, None]
    valid_BxT = idx[None, :] < lengths_B[:, None]
    return causal_TxT[None] & valid_BxT[:, None, :]

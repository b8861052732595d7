"""Tree-verification attention: N new tokens (tree nodes) per sequence against that sequence's
KV-cache prefix plus the new block under a block mask, as a Pallas kernel beside its jnp
reference.

Contract (SpecInfer, Miao et al. 2024; EAGLE-2, Li et al. 2024): query t of sequence b sees
every cached slot s < cache_len[b] and new token j iff block_mask[b, t, j]. Shapes: B batch,
T queries, J new keys (J = T for a forward over the new tokens, J > T for a draft's side
buffer), S cache slots, Q query heads, K kv heads (G = Q / K per group), D head dim.
The cache is [B, K, S, D], one contiguous [S, D] matrix per (sequence, kv head): the layout
both kernels read in blocks, so no call reshapes or copies it (models/kv_cache.py keeps it).

Kernel: one program per (sequence, kv head), with the online softmax of FlashAttention
(Milakov & Gimelshein 2018; Dao et al. 2022). Its T * G query rows (all query heads of the
group, every tree node) are one matrix, so each cache block is read once for the whole group.
The program walks the cache blocks below cache_len[b] one after another (ragged lengths skip
the rest), folding each into a running max, sum and float32 accumulator, then folds in the
tree block under its mask. The cache axis is not split across programs (there is no
flash-decoding split-K, Dao et al. 2023): the grid is B * K programs, so a long cache shared
by few (sequence, kv head) pairs is read by few programs. No [T, S] mask is ever built for the
prefix: visibility there is a comparison of a block's slot index with cache_len. Inputs may be
float32 or bfloat16; scores, softmax and accumulation are float32. Block sizes come as a
`BlockSizes` (DEFAULT_BLOCKS here); the wrapper checks its operands' shapes at trace time.

A query row that sees no key at all (only padding rows do) gets zeros from the kernel and
the reference's uniform average; callers never read such rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    NEG,
    BlockSizes,
    check_operands,
    from_query_rows,
    mask_rows,
    matmul_precision,
    pad_to,
    qk_scores,
    query_rows,
)

DEFAULT_BLOCKS = BlockSizes(block_s=128)


def tree_attention_reference(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                             k_cache_BxKxSxD=None, v_cache_BxKxSxD=None, cache_len_B=None):
    """Grouped-query attention in plain jnp; softmax in float32; returns [B, T, Q, D] in q's
    dtype. Without a cache, only the new block is attended (training, prefill from empty)."""
    check_operands("tree_attention_reference", q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD,
                   block_mask_BxTxJ, k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B,
                   needs_cache=False)
    b, t, nq, d = q_BxTxQxD.shape
    nk = k_new_BxJxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxQxD.reshape(b, t, nk, nq // nk, d)
    scale = d ** -0.5
    f32 = jnp.float32

    s_new = jnp.einsum("btkgd,bjkd->bkgtj", q_BxTxKxGxD, k_new_BxJxKxD,
                       preferred_element_type=f32) * scale
    s_new = jnp.where(block_mask_BxTxJ[:, None, None], s_new, NEG)
    if k_cache_BxKxSxD is None:
        p = jax.nn.softmax(s_new, axis=-1)
        out = jnp.einsum("bkgtj,bjkd->btkgd", p.astype(v_new_BxJxKxD.dtype), v_new_BxJxKxD,
                         preferred_element_type=f32)
        return out.reshape(b, t, nq, d).astype(q_BxTxQxD.dtype)

    s_len = k_cache_BxKxSxD.shape[2]
    s_old = jnp.einsum("btkgd,bksd->bkgts", q_BxTxKxGxD, k_cache_BxKxSxD,
                       preferred_element_type=f32) * scale
    visible_BxS = jnp.arange(s_len)[None, :] < cache_len_B[:, None]
    s_old = jnp.where(visible_BxS[:, None, None, None, :], s_old, NEG)
    p = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)
    p_old, p_new = p[..., :s_len], p[..., s_len:]
    # The products keep the cache's (b, k) batch order and transpose only the small result:
    # XLA:CPU cannot run a bfloat16 dot with a float32 result laid out in another order
    # ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32").
    out_BxKxGxTxD = jnp.einsum("bkgts,bksd->bkgtd", p_old.astype(v_cache_BxKxSxD.dtype),
                               v_cache_BxKxSxD, preferred_element_type=f32)
    out_BxKxGxTxD = out_BxKxGxTxD + jnp.einsum(
        "bkgtj,bjkd->bkgtd", p_new.astype(v_new_BxJxKxD.dtype), v_new_BxJxKxD,
        preferred_element_type=f32)
    out = out_BxKxGxTxD.transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, nq, d).astype(q_BxTxQxD.dtype)


def _kernel(cache_len_ref, q_ref, k_new_ref, v_new_ref, mask_ref, k_cache_ref, v_cache_ref,
            o_ref, *, block_s: int, scale: float):
    """One (sequence b, kv head k). Refs: cache_len [B], q [R, D] (R = padded T * G rows),
    k_new/v_new [Jp, D], mask [R, Jp], caches [B, K, S, D] (whole), out [R, D]."""
    b, k = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32
    q_RxD = q_ref[...]
    rows, d = q_RxD.shape
    precision = matmul_precision(q_RxD.dtype)

    def fold(carry, s_RxC, visible_RxC, v_CxD):
        """Online softmax: merge one block of scores into (max, sum, accumulator)."""
        m_R, l_R, acc_RxD = carry
        s_RxC = jnp.where(visible_RxC, s_RxC, NEG)
        m_new = jnp.maximum(m_R, s_RxC.max(axis=1))
        p_RxC = jnp.where(visible_RxC, jnp.exp(s_RxC - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_R - m_new)
        pv = jax.lax.dot_general(p_RxC.astype(v_CxD.dtype), v_CxD, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=f32)
        return m_new, alpha * l_R + p_RxC.sum(axis=1), alpha[:, None] * acc_RxD + pv

    def scores(k_CxD):
        return qk_scores(q_RxD, k_CxD, scale, precision)

    cache_len = cache_len_ref[b]

    def prefix_block(i, carry):
        start = pl.multiple_of(i * block_s, block_s)
        k_CxD = k_cache_ref[b, k, pl.ds(start, block_s), :]
        v_CxD = v_cache_ref[b, k, pl.ds(start, block_s), :]
        slot_C = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_s), 1)
        return fold(carry, scores(k_CxD), slot_C < cache_len, v_CxD)

    carry = (jnp.full((rows,), NEG, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, d), f32))
    carry = jax.lax.fori_loop(0, pl.cdiv(cache_len, block_s), prefix_block, carry)
    v_new = v_new_ref[...]
    _, l_R, acc_RxD = fold(carry, scores(k_new_ref[...]), mask_ref[...] != 0, v_new)
    o_ref[...] = (acc_RxD / jnp.where(l_R == 0, 1.0, l_R)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def tree_attention(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ, k_cache_BxKxSxD,
                   v_cache_BxKxSxD, cache_len_B, *, blocks: BlockSizes = DEFAULT_BLOCKS,
                   interpret: bool = False):
    """The kernel; same contract and result as `tree_attention_reference` with a cache."""
    check_operands("tree_attention", q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                   k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B, needs_cache=True)
    b, t, nq, d = q_BxTxQxD.shape
    j, nk = k_new_BxJxKxD.shape[1], k_new_BxJxKxD.shape[2]
    g, s = nq // nk, k_cache_BxKxSxD.shape[2]
    # GPU (Triton) tiles need power-of-two sides of at least 16: pad the query rows and the
    # new block; padded keys are masked out and padded rows are sliced off.
    rows = max(16, pl.next_power_of_2(t * g))
    jp = max(16, pl.next_power_of_2(j))
    q_BxKxRxD = query_rows(q_BxTxQxD, nk, rows)
    mask_BxRxJ = mask_rows(block_mask_BxTxJ, g, rows, jp)
    k_new = pad_to(k_new_BxJxKxD, 1, jp)
    v_new = pad_to(v_new_BxJxKxD, 1, jp)
    bs = blocks.cache_block(s)

    kernel = functools.partial(_kernel, block_s=bs, scale=d ** -0.5)
    sq = pl.Squeezed()
    whole = pl.BlockSpec(memory_space=pl.ANY)  # left where it is; the kernel reads slices
    out = pl.pallas_call(
        kernel,
        grid=(b, nk),
        in_specs=[
            whole,
            pl.BlockSpec((sq, sq, rows, d), lambda i, k: (i, k, 0, 0)),
            pl.BlockSpec((sq, jp, sq, d), lambda i, k: (i, 0, k, 0)),
            pl.BlockSpec((sq, jp, sq, d), lambda i, k: (i, 0, k, 0)),
            pl.BlockSpec((sq, rows, jp), lambda i, k: (i, 0, 0)),
            whole,
            whole,
        ],
        out_specs=pl.BlockSpec((sq, sq, rows, d), lambda i, k: (i, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nk, rows, d), q_BxTxQxD.dtype),
        interpret=interpret,
        # Triton, by name: jax 0.10 lowers an unmarked GPU kernel to Mosaic GPU instead, which
        # cannot lay out this kernel's iota ("Failed to infer the output layout").
        compiler_params=pltriton.CompilerParams(),
        name="tree_attention",
    )(cache_len_B.astype(jnp.int32), q_BxKxRxD, k_new, v_new, mask_BxRxJ, k_cache_BxKxSxD,
      v_cache_BxKxSxD)
    return from_query_rows(out, t, g)

"""Tree-verification attention for TPU (Mosaic): the same contract and result as
tree_attention.py (see there), laid out the way TPU Pallas pipelines memory.

Grid (B, K, S / block_s), the last dimension sequential: each step brings one cache block of
one (sequence, KV head) from HBM into VMEM, and an online softmax in VMEM scratch (running max,
sum and float32 accumulator over the group's T * G query rows) folds it in. The sequence
lengths are scalar-prefetched, so the block index map clamps every block past a sequence's
length to its last valid block: Pallas skips the copy of a block index it already holds, and
`pl.when` skips the compute, so a short sequence costs only its own blocks. The tree block and
the output are handled at the last step. Like the GPU-style kernel this is FlashAttention's
online softmax with one (sequence, KV head) walking its cache blocks in order; the cache axis
is a sequential grid dimension, not split across cores (no flash-decoding split-K).

TPU tiles need their last two block dimensions divisible by (8, 128). The cache is
[B, K, S, D] (models/kv_cache.py keeps it so), and each step reads one [block_s, D] tile of it
as it lies in HBM: no relayout of the cache before the call. (An earlier [B, S, K, D] cache,
viewed as [B, S, K * D], was not a free reshape under TPU tiling: XLA copied the whole cache
at every layer of every step.) The tile needs D % 128 == 0 and a cache block
(`BlockSizes.cache_block`) of a multiple of 8 slots; `supported` says whether a shape
qualifies (dispatch falls back to the reference otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    NEG,
    BlockSizes,
    check_operands,
    context_device,
    from_query_rows,
    mask_rows,
    matmul_precision,
    pad_to,
    qk_scores,
    query_rows,
)

DEFAULT_BLOCKS = BlockSizes(block_s=512)

MiB = 1 << 20
SCOPED_VMEM_BYTES = {"v4": 16 * MiB, "v5e": 16 * MiB, "v5p": 16 * MiB, "v6e": 32 * MiB}
"""The VMEM a Mosaic kernel may use unless its compiler parameters raise the limit (XLA's
default scoped VMEM), by TPU generation. A block whose working set exceeds it fails to
compile ("CompileTimeScopedVmemOom")."""

_GENERATIONS = (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
                ("v5", "v5p"), ("v4", "v4"))


def generation(device_kind: str) -> str | None:
    """The TPU generation of a device kind ("TPU v5 lite" -> "v5e"), None if not a TPU's."""
    kind = device_kind.lower()
    if "tpu" not in kind:
        return None
    return next((gen for part, gen in _GENERATIONS if part in kind), None)


def scoped_vmem_bytes(device_kind: str) -> int:
    """The scoped VMEM limit for a device kind; the smallest of any generation where the kind
    is unknown (another TPU, or the interpret mode on a CPU)."""
    return SCOPED_VMEM_BYTES.get(generation(device_kind) or "", min(SCOPED_VMEM_BYTES.values()))


def vmem_bytes(blocks: BlockSizes, s: int, rows: int, jp: int, d: int, dtype) -> int:
    """The kernel's VMEM working set for a cache of S slots, R query rows, Jp new keys and
    head dim D: its input and output tiles, each double-buffered by the pipeline (q, out,
    the new keys and values, the mask, one cache block of keys and one of values), its f32
    scratch, and the f32 scores and probabilities of one cache block. Lane dimensions are
    rounded up to 128, as VMEM holds them. An estimate, checked against the compiler in
    tests/test_tpu_compile.py."""
    lanes = lambda n: -(-n // 128) * 128  # noqa: E731
    item, f32 = jnp.dtype(dtype).itemsize, 4
    bs = blocks.cache_block(s)
    tiles = (2 * rows + 2 * jp + 2 * bs) * lanes(d) * item + rows * lanes(jp) * 4
    scratch = (2 * 128 + lanes(d)) * rows * f32
    work = 2 * rows * lanes(bs) * f32
    return 2 * tiles + scratch + work


def fit_blocks(blocks: BlockSizes, s: int, rows: int, jp: int, d: int, dtype,
               limit: int) -> BlockSizes:
    """`blocks` with block_s halved until the working set fits in `limit` bytes of VMEM (or
    it reaches 8 slots, the smallest tile)."""
    while blocks.block_s > 8 and vmem_bytes(blocks, s, rows, jp, d, dtype) > limit:
        blocks = BlockSizes(block_s=blocks.block_s // 2)
    return blocks


def check_fits(blocks: BlockSizes, s: int, rows: int, jp: int, d: int, dtype, limit: int,
               device_kind: str) -> None:
    """Raise ValueError, naming the block, the VMEM it needs and the chip's limit, unless
    the working set fits."""
    need = vmem_bytes(blocks, s, rows, jp, d, dtype)
    if need > limit:
        largest = fit_blocks(blocks, s, rows, jp, d, dtype, limit).block_s
        raise ValueError(
            f"tree_attention_tpu: BlockSizes(block_s={blocks.block_s}) needs about "
            f"{need / MiB:.1f} MiB of VMEM for a cache of {s} slots ({rows} query rows, head "
            f"dim {d}, {jnp.dtype(dtype).name}), over the {limit / MiB:.0f} MiB scoped limit "
            f"of {device_kind}; block_s={largest} fits (or leave blocks unset)")


def _device_kind() -> str:
    """The kind of the devices the program being traced is for (the context mesh's, else the
    default backend's)."""
    device = context_device()
    kind = None if device is None else getattr(device, "device_kind", None)
    return kind or jax.devices()[0].device_kind


def supported(head_dim: int, s: int, blocks: BlockSizes = DEFAULT_BLOCKS) -> bool:
    """Whether Mosaic can tile the problem: D a multiple of 128 and the cache block for a
    cache of S slots (`blocks.cache_block(s)`) a multiple of 8."""
    return head_dim % 128 == 0 and blocks.cache_block(s) % 8 == 0


def _kernel(lens_ref, q_ref, k_new_ref, v_new_ref, mask_ref, k_ref, v_ref, o_ref,
            m_ref, l_ref, acc_ref, *, block_s: int, scale: float):
    """Refs: lens [B] (SMEM), q [R, D], k_new/v_new [Jp, D], mask [R, Jp], this step's
    cache tiles k/v [block_s, D], out [R, D]; scratch m, l [R, 1] and acc [R, D] (f32)."""
    b, i = pl.program_id(0), pl.program_id(2)
    f32 = jnp.float32
    precision = matmul_precision(q_ref.dtype)

    def fold(s_RxC, visible_RxC, v_CxD):
        m_prev, l_prev = m_ref[...], l_ref[...]
        s_RxC = jnp.where(visible_RxC, s_RxC, NEG)
        m_new = jnp.maximum(m_prev, s_RxC.max(axis=1, keepdims=True))
        p_RxC = jnp.where(visible_RxC, jnp.exp(s_RxC - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        m_ref[...] = m_new
        l_ref[...] = alpha * l_prev + p_RxC.sum(axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
            p_RxC.astype(v_CxD.dtype), v_CxD, (((1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=f32)

    def scores(k_CxD):
        return qk_scores(q_ref[...], k_CxD, scale, precision)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, f32)
        l_ref[...] = jnp.zeros(l_ref.shape, f32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    length = lens_ref[b]

    @pl.when(i * block_s < length)
    def _prefix():
        rows = q_ref.shape[0]
        slot = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (rows, block_s), 1)
        fold(scores(k_ref[...]), slot < length, v_ref[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _tree_and_out():
        fold(scores(k_new_ref[...]), mask_ref[...] != 0, v_new_ref[...])
        total = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(total == 0, 1.0, total)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def tree_attention_tpu(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                       k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B, *,
                       blocks: BlockSizes | None = None, interpret: bool = False):
    """The TPU kernel; `interpret=True` runs it in the TPU interpret mode (on CPU). `blocks`
    None: DEFAULT_BLOCKS, shrunk until the working set fits the chip's scoped VMEM; blocks
    given that do not fit are refused (ValueError) before Mosaic would fail on them."""
    check_operands("tree_attention_tpu", q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD,
                   block_mask_BxTxJ, k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B,
                   needs_cache=True)
    b, t, nq, d = q_BxTxQxD.shape
    j, nk = k_new_BxJxKxD.shape[1], k_new_BxJxKxD.shape[2]
    g, s = nq // nk, k_cache_BxKxSxD.shape[2]
    rows = -(-t * g // 8) * 8
    jp = -(-j // 8) * 8
    kind = _device_kind()
    limit = scoped_vmem_bytes(kind)
    if blocks is None:
        blocks = fit_blocks(DEFAULT_BLOCKS, s, rows, jp, d, k_cache_BxKxSxD.dtype, limit)
    else:
        check_fits(blocks, s, rows, jp, d, k_cache_BxKxSxD.dtype, limit, kind)
    bs = blocks.cache_block(s)
    q = query_rows(q_BxTxQxD, nk, rows)
    mask = mask_rows(block_mask_BxTxJ, g, rows, jp)
    k_new = pad_to(k_new_BxJxKxD, 1, jp).reshape(b, jp, nk * d)
    v_new = pad_to(v_new_BxJxKxD, 1, jp).reshape(b, jp, nk * d)

    def cache_block(bi, ki, si, lens):
        last = jnp.maximum(pl.cdiv(lens[bi], bs) - 1, 0)
        return bi, ki, jnp.minimum(si, last), 0  # past the length: the block already held

    sq = pl.Squeezed()
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, nk, s // bs),
        in_specs=[
            pl.BlockSpec((sq, sq, rows, d), lambda bi, ki, si, lens: (bi, ki, 0, 0)),
            pl.BlockSpec((sq, jp, d), lambda bi, ki, si, lens: (bi, 0, ki)),
            pl.BlockSpec((sq, jp, d), lambda bi, ki, si, lens: (bi, 0, ki)),
            pl.BlockSpec((sq, rows, jp), lambda bi, ki, si, lens: (bi, 0, 0)),
            pl.BlockSpec((sq, sq, bs, d), cache_block),
            pl.BlockSpec((sq, sq, bs, d), cache_block),
        ],
        out_specs=pl.BlockSpec((sq, sq, rows, d), lambda bi, ki, si, lens: (bi, ki, 0, 0)),
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_s=bs, scale=d ** -0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, nk, rows, d), q_BxTxQxD.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tree_attention_tpu",
    )(cache_len_B.astype(jnp.int32), q, k_new, v_new, mask, k_cache_BxKxSxD, v_cache_BxKxSxD)
    return from_query_rows(out, t, g)

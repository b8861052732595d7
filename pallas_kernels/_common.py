"""What both tree-attention kernels share (tree_attention.py, the GPU-style one, and
tree_attention_tpu.py): the block-size config, the operand checks every public wrapper runs,
and the layout that makes a kv head's query heads and tree nodes one matrix of query rows.

Shape vocabulary (as in tree_attention.py): B batch, T queries (tree nodes), J new keys,
S cache slots, Q query heads, K kv heads, G = Q / K query heads per kv head, D head dim;
inside a kernel R is the padded T * G query rows of one (sequence, kv head), Jp the padded J
and C the slots of one block of keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # finite: a fully masked row must not turn the softmax into NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a tree-attention kernel; frozen and hashable, so a jit static argument
    (each distinct value compiles its own kernel). Every field is a positive power of two."""

    block_s: int
    """Cache slots a program reads per step (shrunk to divide S, see `cache_block`)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
                raise ValueError(f"BlockSizes.{field.name} must be a positive power of two, "
                                 f"got {v!r}")

    def cache_block(self, s: int) -> int:
        """Slots per cache block for a cache of S slots: the largest power of two <= block_s
        that divides S, so no block runs past the cache and no load needs a mask."""
        bs = self.block_s
        while s % bs:
            bs //= 2
        return bs


# The axes of each operand, and what a mismatch in each is called.
_AXES = {"q": "BTQD", "k_new": "BJKD", "v_new": "BJKD", "block_mask": "BTJ",
         "k_cache": "BKSD", "v_cache": "BKSD", "cache_len": "B"}
_AXIS_NAMES = {"B": "batch", "T": "queries", "J": "new keys", "S": "cache slots",
               "Q": "query heads", "K": "kv heads", "D": "head dim"}


def check_operands(fn: str, q, k_new, v_new, block_mask, k_cache, v_cache, cache_len, *,
                   needs_cache: bool) -> None:
    """Raise ValueError, naming `fn`, the operands and their shapes, unless the operands fit
    the contract: ranks as in _AXES, every axis letter one size across operands, Q a multiple
    of K, float q/k/v, a bool or integer block mask and integer cache lengths. A cache is
    k_cache, v_cache and cache_len together (always, where `needs_cache`); without k_cache
    and v_cache, cache_len is ignored, as the reference ignores it. Shapes are static, so
    under jit this runs once, at trace time."""
    if needs_cache or k_cache is not None or v_cache is not None:
        given = {"k_cache": k_cache, "v_cache": v_cache, "cache_len": cache_len}
        missing = [n for n, x in given.items() if x is None]
        if missing:
            raise ValueError(f"{fn}: attending to a cache needs k_cache, v_cache and "
                             f"cache_len; {', '.join(missing)} missing")
    else:
        cache_len = None
    ops = {"q": q, "k_new": k_new, "v_new": v_new, "block_mask": block_mask,
           "k_cache": k_cache, "v_cache": v_cache, "cache_len": cache_len}
    ops = {n: x for n, x in ops.items() if x is not None}

    def show(n):
        return f"{n} [{','.join(_AXES[n])}]=({','.join(map(str, ops[n].shape))})"

    for n, x in ops.items():
        if x.ndim != len(_AXES[n]):
            raise ValueError(f"{fn}: {n} must have rank {len(_AXES[n])}, got {show(n)}")
    owner: dict[str, str] = {}  # axis letter -> the first operand that has it, which fixes its size
    for n, x in ops.items():
        for axis, size in zip(_AXES[n], x.shape, strict=True):
            first = owner.setdefault(axis, n)
            want = ops[first].shape[_AXES[first].index(axis)]
            if size != want:
                raise ValueError(f"{fn}: {n} has {_AXIS_NAMES[axis]} {size} but {first} has "
                                 f"{want} ({show(first)}, {show(n)})")
    nq, nk = q.shape[2], k_new.shape[2]
    if nk == 0 or nq % nk:
        raise ValueError(f"{fn}: q's {nq} query heads are not a multiple of k_new's {nk} kv "
                         f"heads ({show('q')}, {show('k_new')})")
    for n in ("q", "k_new", "v_new", "k_cache", "v_cache"):
        if n in ops and not jnp.issubdtype(ops[n].dtype, jnp.floating):
            raise ValueError(f"{fn}: {n} must be floating point, got {ops[n].dtype}")
    if not (block_mask.dtype == jnp.bool_ or jnp.issubdtype(block_mask.dtype, jnp.integer)):
        raise ValueError(f"{fn}: block_mask must be bool or integer (nonzero = visible), got "
                         f"{block_mask.dtype}")
    if cache_len is not None and not jnp.issubdtype(cache_len.dtype, jnp.integer):
        raise ValueError(f"{fn}: cache_len must be integer, got {cache_len.dtype}")


def context_device():
    """The abstract device of the context mesh (`jax.set_mesh`), the devices the program being
    traced is for, which a CPU host may describe for a TPU it compiles for; None without a
    mesh (the default backend's devices then)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh.abstract_device


def pad_to(x, axis: int, size: int):
    """Zero-pad one axis of x up to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def query_rows(q_BxTxQxD, nk: int, rows: int):
    """[B, T, Q, D] -> [B, K, R, D]: each kv head's T * G query rows as one matrix (row
    t * G + g is node t's g-th query head of the group), zero-padded to R rows, so a block
    of keys is read once for the whole group."""
    b, t, nq, d = q_BxTxQxD.shape
    g = nq // nk
    q_BxKxRxD = q_BxTxQxD.reshape(b, t, nk, g, d).transpose(0, 2, 1, 3, 4).reshape(b, nk, t * g, d)
    return pad_to(q_BxKxRxD, 2, rows)


def mask_rows(block_mask_BxTxJ, g: int, rows: int, jp: int):
    """The block mask in query-row layout, [B, R, Jp] int32: row t * G + g is node t's
    mask; padded rows and keys are hidden."""
    mask_BxRxJ = jnp.repeat(block_mask_BxTxJ, g, axis=1).astype(jnp.int32)
    return pad_to(pad_to(mask_BxRxJ, 1, rows), 2, jp)


def from_query_rows(out_BxKxRxD, t: int, g: int):
    """`query_rows` undone: [B, K, R, D] -> [B, T, Q, D], padding rows dropped."""
    b, nk, _, d = out_BxKxRxD.shape
    out_BxTxKxGxD = out_BxKxRxD[:, :, : t * g].reshape(b, nk, t, g, d).transpose(0, 2, 1, 3, 4)
    return out_BxTxKxGxD.reshape(b, t, nk * g, d)


def matmul_precision(dtype):
    """fp32 inputs get fp32 products (a GPU would otherwise use TF32 tensor cores)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def qk_scores(q_RxD, k_CxD, scale: float, precision):
    """Scaled scores q k^T [R, C] in float32."""
    return jax.lax.dot_general(q_RxD, k_CxD, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32) * scale

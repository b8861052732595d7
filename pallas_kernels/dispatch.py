"""One place that decides, per call site, whether a kernel or its jnp reference runs.

Implementations (a model config's `attention` field):
  "auto"       the Pallas kernel on GPU (tree_attention.py, lowered through Triton) and TPU
               (tree_attention_tpu.py, Mosaic; for head_dim % 128 == 0, else the reference),
               the jnp reference elsewhere (CPU)
  "reference"  always the jnp reference
  "pallas"     the kernel for the backend, even where "auto" would not pick it
  "interpret"  the GPU-style kernel in Pallas interpret mode: runs anywhere, slowly; for tests
The kernel covers attention against a KV cache (decode, tree verification, drafting). Calls
without a cache (training, which needs gradients the kernel does not define, and prefill from
an empty cache) always take the reference, in pieces of QUERY_CHUNK queries when longer. With
a cache, the reference reads only the slots some sequence holds (a branch per LIVE_BUCKET
doubling; not on TPU, see `_over_live_slots`).
`attention` checks its operands' shapes first (at trace time), so a mismatch is named the same
way whichever implementation would have run.

The platform is the one the program is being compiled for: the devices of the context mesh
(`jax.set_mesh`, which the engine sets around every program it compiles, and which lets a CPU
host compile for an abstract TPU topology), else the default backend. Under a mesh of more
than one device the kernel runs inside `shard_map` (Mosaic and Triton calls cannot be
partitioned automatically): the batch split over "dp" and the KV heads (with their query
heads) over "tp", as the cache is laid out (models/sharding.py); an axis that does not divide
stays whole, and each device then computes that part of the problem in full.

Before "auto" first picks a kernel on a backend, it compiles and runs it once on a small
problem against the reference; a kernel that fails to lower or disagrees (a jax version whose
Pallas backend changed, say) is logged and the reference is used instead, so serving never
depends on an untested lowering.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import tree_attention_tpu as tpu
from pallas_kernels._common import BlockSizes, check_operands, context_device
from pallas_kernels.tree_attention import (
    DEFAULT_BLOCKS,
    tree_attention,
    tree_attention_reference,
)

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
KERNEL_BACKENDS = ("gpu", "tpu")

log = logging.getLogger(__name__)


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {impl!r}")
    return impl


def platform() -> str:
    """The platform the program being traced is for: the context mesh's, else the default
    backend's ("cpu", "gpu" or "tpu")."""
    device = context_device()
    if device is None or device.platform is None:
        return jax.default_backend()
    return "gpu" if device.platform in ("cuda", "rocm") else device.platform


def resolve(impl: str) -> str:
    """"auto" made concrete for the platform: "pallas" or "reference"."""
    if check_impl(impl) != "auto":
        return impl
    backend = platform()
    return "pallas" if backend in KERNEL_BACKENDS and kernel_works(backend) else "reference"


@functools.cache
def kernel_works(backend: str) -> bool:
    """The backend's kernel, compiled and run on a small ragged problem, equals the
    reference (checked once per process)."""
    rs = np.random.RandomState(0)
    b, t, nq, nk, d, s = 2, 8, 4, 2, 128, 256
    f = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32)  # noqa: E731
    args = (f(b, t, nq, d), f(b, t, nk, d), f(b, t, nk, d),
            jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0), f(b, nk, s, d),
            f(b, nk, s, d), jnp.asarray([s, 37], jnp.int32))
    try:
        with jax.default_matmul_precision("highest"):
            kernel = (tpu.tree_attention_tpu(*args) if backend == "tpu"
                      else tree_attention(*args))
            ref = tree_attention_reference(*args)
        err = float(jnp.max(jnp.abs(kernel - ref)))
        if not err < 1e-4:
            raise ValueError(f"max error {err:.3g} against the reference")
    except Exception as e:  # noqa: BLE001 (any failure: serve with the reference)
        log.warning("the Pallas tree-attention kernel does not work on %s (%s: %s); "
                    "using the jnp reference", backend, type(e).__name__, e)
        return False
    return True


def attention(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
              k_cache_BxKxSxD=None, v_cache_BxKxSxD=None, cache_len_B=None, *,
              impl: str = "auto", blocks: BlockSizes | None = None):
    """Grouped-query attention of T new queries against a cache prefix (< cache_len) and J
    new keys under `block_mask`; see tree_attention.py for the contract. `blocks`: the
    kernel's block sizes (None: that kernel's DEFAULT_BLOCKS; on TPU shrunk to fit VMEM)."""
    check_operands("attention", q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                   k_cache_BxKxSxD, v_cache_BxKxSxD, cache_len_B, needs_cache=False)
    args = (q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ, k_cache_BxKxSxD,
            v_cache_BxKxSxD, cache_len_B)
    t = q_BxTxQxD.shape[1]
    if k_cache_BxKxSxD is None and t > QUERY_CHUNK and t % QUERY_CHUNK == 0:
        return _in_query_chunks(tree_attention_reference, args, QUERY_CHUNK)
    how = "reference" if k_cache_BxKxSxD is None else resolve(impl)
    if how == "reference":
        return _over_live_slots(tree_attention_reference, args)
    if how == "interpret" or platform() != "tpu":
        return _per_shard(functools.partial(tree_attention, blocks=blocks or DEFAULT_BLOCKS,
                                            interpret=how == "interpret"), args)
    if not tpu.supported(q_BxTxQxD.shape[-1], k_cache_BxKxSxD.shape[2],
                         blocks or tpu.DEFAULT_BLOCKS):
        return tree_attention_reference(*args)
    return _per_shard(functools.partial(tpu.tree_attention_tpu, blocks=blocks), args)


QUERY_CHUNK = 256
"""Queries per piece of a call without a cache (prefill from empty, training) that has more
than this many, in a multiple of it. The reference's float32 scores are [B, K, G, T, J]: for
a 1024-token Llama-3.1-8B prefill that is 128 MiB per layer, which put the program over v5e's
HBM; a piece of 256 queries holds 32 MiB. Each query row is computed as before."""


LIVE_BUCKET = 256
"""The smallest cache prefix the reference attends over with a cache: it reads the first
256, 512, 1024, ... slots (or all S), the fewest that hold every sequence's cache_len."""


def live_sizes(s: int) -> list[int]:
    """The cache prefixes a reference call over an S-slot cache may read: LIVE_BUCKET
    doubled while below S, then S."""
    sizes = []
    n = LIVE_BUCKET
    while n < s:
        sizes.append(n)
        n *= 2
    return sizes + [s]


def _over_live_slots(fn, args):
    """`fn(*args)` (with a cache) over only the cache slots some sequence can see: one branch
    per size of `live_sizes`, the smallest that holds max(cache_len) chosen at run time
    (`lax.switch`), so a step pays for the tokens its sequences hold rather than the slots
    the cache could hold. Slots at or past every cache_len are masked out whole, so each
    branch computes what the whole call does.

    Not on TPU, where the kernel reads only live blocks and the reference reads the whole
    cache as before: XLA:TPU (libtpu 0.0.42.1) fails to compile this switch on a dp x tp
    mesh ("INTERNAL: ... Bitcast cannot have different shape sizes", v5e:2x2/dp2xtp2)."""
    q, k_new, v_new, mask, k_cache, v_cache, cache_len = args
    if k_cache is None or len(sizes := live_sizes(k_cache.shape[2])) == 1 \
            or platform() == "tpu":
        return fn(*args)
    index = jnp.sum(jnp.max(cache_len) > jnp.asarray(sizes[:-1], cache_len.dtype))
    branches = [functools.partial(
        lambda n, kc, vc: fn(q, k_new, v_new, mask, kc[:, :, :n], vc[:, :, :n], cache_len), n)
        for n in sizes]
    return jax.lax.switch(index, branches, k_cache, v_cache)


def _in_query_chunks(fn, args, chunk: int):
    """`fn(*args)` (cache-less: args[4:] are None) one piece of `chunk` queries at a time
    (`lax.map`, so that one piece's scores are live at once), each against every new key."""
    q, k_new, v_new, mask = args[:4]
    b, t = q.shape[:2]
    pieces = t // chunk
    q_NxBxCxQxD = q.reshape(b, pieces, chunk, *q.shape[2:]).swapaxes(0, 1)
    mask_NxBxCxJ = mask.reshape(b, pieces, chunk, mask.shape[-1]).swapaxes(0, 1)
    out = jax.lax.map(lambda qm: fn(qm[0], k_new, v_new, qm[1]), (q_NxBxCxQxD, mask_NxBxCxJ))
    return out.swapaxes(0, 1).reshape(q.shape)


def _per_shard(kernel, args):
    """`kernel(*args)`, inside `shard_map` over the context mesh when it has more than one
    device: the batch over "dp" and the KV heads over "tp" where they divide (see above)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    q, k_new = args[0], args[1]

    def axis(name: str, size: int):
        return name if name in mesh.axis_names and size % mesh.shape[name] == 0 else None

    b, h = axis("dp", q.shape[0]), axis("tp", k_new.shape[2])
    heads = P(b, None, h, None)  # q [B,T,Q,D], k/v new [B,J,K,D]
    cache = P(b, h, None, None)  # [B,K,S,D]
    in_specs = (heads, heads, heads, P(b, None, None), cache, cache, P(b))
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=heads,
                         check_vma=False)(*args)

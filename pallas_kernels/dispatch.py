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
an empty cache) always take the reference.
"""

from __future__ import annotations

import jax

from pallas_kernels import tree_attention_tpu as tpu
from pallas_kernels.tree_attention import tree_attention, tree_attention_reference

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
KERNEL_BACKENDS = ("gpu", "tpu")


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {impl!r}")
    return impl


def resolve(impl: str) -> str:
    """"auto" made concrete for the default backend: "pallas" or "reference"."""
    if check_impl(impl) != "auto":
        return impl
    return "pallas" if jax.default_backend() in KERNEL_BACKENDS else "reference"


def attention(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
              k_cache_BxSxKxD=None, v_cache_BxSxKxD=None, cache_len_B=None, *,
              impl: str = "auto"):
    """Grouped-query attention of T new queries against a cache prefix (< cache_len) and J
    new keys under `block_mask`; see tree_attention.py for the contract."""
    how = "reference" if k_cache_BxSxKxD is None else resolve(impl)
    on_tpu = how == "pallas" and jax.default_backend() == "tpu"
    if on_tpu and not tpu.supported(q_BxTxQxD.shape[-1], k_cache_BxSxKxD.shape[1]):
        how = "reference"
    if how == "reference":
        return tree_attention_reference(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD,
                                        block_mask_BxTxJ, k_cache_BxSxKxD, v_cache_BxSxKxD,
                                        cache_len_B)
    args = (q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ, k_cache_BxSxKxD,
            v_cache_BxSxKxD, cache_len_B)
    if on_tpu:
        return tpu.tree_attention_tpu(*args)
    return tree_attention(*args, interpret=how == "interpret")

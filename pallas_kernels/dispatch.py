"""One place that decides, per call site, whether a kernel or its jnp reference runs.

Implementations (a model config's `attention` field):
  "auto"       the Pallas kernel where it has been built for the backend (GPU), the jnp
               reference elsewhere (CPU; TPU until a Mosaic variant of the kernel exists)
  "reference"  always the jnp reference
  "pallas"     always the kernel (fails to lower on a backend it does not support)
  "interpret"  the kernel in Pallas interpret mode: runs anywhere, slowly; for tests on CPU
The kernel covers attention against a KV cache (decode, tree verification, drafting). Calls
without a cache (training, which needs gradients the kernel does not define, and prefill from
an empty cache) always take the reference.
"""

from __future__ import annotations

import jax

from pallas_kernels.tree_attention import tree_attention, tree_attention_reference

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
KERNEL_BACKENDS = ("gpu",)


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
    how = resolve(impl)
    if how == "reference" or k_cache_BxSxKxD is None:
        return tree_attention_reference(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD,
                                        block_mask_BxTxJ, k_cache_BxSxKxD, v_cache_BxSxKxD,
                                        cache_len_B)
    return tree_attention(q_BxTxQxD, k_new_BxJxKxD, v_new_BxJxKxD, block_mask_BxTxJ,
                          k_cache_BxSxKxD, v_cache_BxSxKxD, cache_len_B,
                          interpret=how == "interpret")

"""Draft trees as fixed-shape arrays, so one compiled program serves every tree of a size.

A verification block is the root (the last committed token, whose KV is not cached yet)
followed by N draft nodes: slot 0 is the root, slot i >= 1 a node with `parent[i]` (0 for a
child of the root) and `depth[i]` >= 1. Node i is placed at position `cache_len + depth[i]`
and sees the committed prefix, its ancestors and itself (the tree attention of SpecInfer,
Miao et al. 2024, and EAGLE-2, Li et al. 2024). A chain of length n is the tree with
parent[i] = i - 1. Padding nodes (`valid` false) hang off the root and are never accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Tree:
    tokens: jax.Array  # [B, N+1] int32, slot 0 = root token
    parent: jax.Array  # [B, N+1] int32, parent slot (root's parent is -1)
    depth: jax.Array  # [B, N+1] int32, root 0
    valid: jax.Array  # [B, N+1] bool, root True

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def ancestor_mask(parent_BxT: jax.Array) -> jax.Array:
    """[B, T, T] bool: slot i sees slot j iff j is i or an ancestor of i.

    Computed by pointer doubling over the parent array (log2 T steps), so no Python loop
    over nodes and no per-node gather chain. Parents must come before children."""
    b, t = parent_BxT.shape
    eye = jnp.eye(t, dtype=bool)[None].repeat(b, 0)
    # hop[i] = the ancestor of i reached by following 2^k parent links (root maps to itself).
    hop = jnp.where(parent_BxT < 0, jnp.arange(t)[None], parent_BxT)
    sees = eye | (jax.nn.one_hot(hop, t, dtype=bool) & (parent_BxT >= 0)[..., None])
    for _ in range(max(1, (t - 1).bit_length())):
        # i sees everything its 2^k-ancestor sees.
        sees = sees | jnp.take_along_axis(sees, hop[..., None].repeat(t, -1), axis=1)
        hop = jnp.take_along_axis(hop, hop, axis=1)
    return sees


def chain(root_B: jax.Array, tokens_BxN: jax.Array) -> Tree:
    """A chain tree: root then tokens[0], tokens[1], ... each the child of the previous."""
    b, n = tokens_BxN.shape
    slots = jnp.arange(n + 1, dtype=jnp.int32)
    return Tree(tokens=jnp.concatenate([root_B[:, None], tokens_BxN], 1).astype(jnp.int32),
                parent=jnp.broadcast_to(slots - 1, (b, n + 1)),
                depth=jnp.broadcast_to(slots, (b, n + 1)),
                valid=jnp.ones((b, n + 1), bool))

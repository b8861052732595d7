"""Fixed-shape KV cache: one [B, K, S, D] key and value array per layer.

Heads before slots: each (sequence, kv head) owns one contiguous [S, D] matrix, the tile the
attention kernels read block by block (pallas_kernels/tree_attention*.py), so no program
relayouts the cache before attending to it. New entries arrive as [B, T, K, D] (the layout a
projection makes) and are transposed on the way in, which costs T slots, not S.

Sequence b's committed tokens live in slots [0, cache_len[b]); cache_len itself is kept by the
caller (the engine's decode state), so one cache serves prefill, decode and tree verification.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from aurora_jax.models.config import TargetConfig


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, D]
    v: tuple[jax.Array, ...]  # L x [B, K, S, D]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def shape(cfg: TargetConfig, batch: int, max_len: int) -> tuple[int, int, int, int]:
        """One layer's key (or value) array shape, [B, K, S, D]."""
        return (batch, cfg.num_kv_heads, max_len, cfg.head_dim)

    @classmethod
    def zeros(cls, cfg: TargetConfig, batch: int, max_len: int, dtype=jnp.float32,
              sharding=None, num_layers: int | None = None) -> KVCache:
        """An empty cache; `sharding` (a NamedSharding for [B, K, S, D]) places it on a mesh.
        `cfg` is any config with the head fields; `num_layers` defaults to cfg.num_layers (the
        one-layer EAGLE-3 draft passes 1)."""
        shape = cls.shape(cfg, batch, max_len)

        def make():
            z = jnp.zeros(shape, dtype)
            return z if sharding is None else jax.device_put(z, sharding)

        layers = cfg.num_layers if num_layers is None else num_layers
        return cls(k=tuple(make() for _ in range(layers)), v=tuple(make() for _ in range(layers)))


def write_block(cache_BxKxSxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array):
    """Writes each sequence's T new entries at slots start[b] .. start[b] + T - 1."""

    def one(c_KxSxD, x_TxKxD, s):
        x_KxTxD = x_TxKxD.transpose(1, 0, 2).astype(c_KxSxD.dtype)
        return jax.lax.dynamic_update_slice(c_KxSxD, x_KxTxD, (0, s, 0))

    return jax.vmap(one)(cache_BxKxSxD, new_BxTxKxD, start_B)


@struct.dataclass
class KVBlock:
    """The keys and values of T new tokens that are not in a cache (yet): a verified tree's,
    until its accepted path is known."""

    k: tuple[jax.Array, ...]  # L x [B, T, K, D]
    v: tuple[jax.Array, ...]  # L x [B, T, K, D]


def commit_path(cache: KVCache, block: KVBlock, start_B: jax.Array,
                path_BxP: jax.Array) -> KVCache:
    """Writes a verified block's accepted path into the cache, in every layer.

    `path[b, p]` is the block slot accepted p-th (slot 0, the root, first; -1 past the
    accepted length): slot start[b] + p gets the entry of block slot path[b, p]. Entries past
    the accepted length are written too, as garbage beyond the new cache length. Only the P
    path entries are written, and nothing is read from the cache: the tree was verified
    against the cache without entering it. (Writing the whole tree first and then moving the
    path into place made a gather over the cache, which the TPU compiler served by
    relayouting the whole cache, at every layer and step.)"""
    idx = jnp.maximum(path_BxP, 0)[:, :, None, None]

    def write(c_BxKxSxD, new_BxTxKxD):
        return write_block(c_BxKxSxD, jnp.take_along_axis(new_BxTxKxD, idx, axis=1), start_B)

    return KVCache(k=tuple(map(write, cache.k, block.k)), v=tuple(map(write, cache.v, block.v)))

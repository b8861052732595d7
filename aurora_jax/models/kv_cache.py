"""Fixed-shape KV cache: one [B, S, K, D] key and value array per layer.

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
    k: tuple[jax.Array, ...]  # L x [B, S, K, D]
    v: tuple[jax.Array, ...]  # L x [B, S, K, D]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @classmethod
    def zeros(cls, cfg: TargetConfig, batch: int, max_len: int, dtype=jnp.float32,
              sharding=None, num_layers: int | None = None) -> KVCache:
        """An empty cache; `sharding` (a NamedSharding for [B, S, K, D]) places it on a mesh.
        `cfg` is any config with the head fields; `num_layers` defaults to cfg.num_layers (the
        one-layer EAGLE-3 draft passes 1)."""
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)

        def make():
            z = jnp.zeros(shape, dtype)
            return z if sharding is None else jax.device_put(z, sharding)

        layers = cfg.num_layers if num_layers is None else num_layers
        return cls(k=tuple(make() for _ in range(layers)), v=tuple(make() for _ in range(layers)))


def write_block(cache_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array):
    """Writes each sequence's T new entries at slots start[b] .. start[b] + T - 1."""

    def one(c_SxKxD, x_TxKxD, s):
        return jax.lax.dynamic_update_slice(c_SxKxD, x_TxKxD.astype(c_SxKxD.dtype), (s, 0, 0))

    return jax.vmap(one)(cache_BxSxKxD, new_BxTxKxD, start_B)


def commit_path(cache_BxSxKxD: jax.Array, start_B: jax.Array, path_BxP: jax.Array):
    """Moves the accepted entries of a verified block into place.

    The block was written at slots start[b] + i for block slot i; `path[b, p]` is the block
    slot accepted p-th (slot 0, the root, first; -1 past the accepted length). Afterwards
    slot start[b] + p holds the entry of block slot path[b, p]. Path slots increase along a
    path (parents precede children), so reading all sources before writing is safe; entries
    past the accepted length are left as garbage beyond the new cache length."""
    def one(c_SxKxD, s, path_P):
        src_P = s + jnp.maximum(path_P, 0)
        rows_PxKxD = jnp.take(c_SxKxD, src_P, axis=0)
        return jax.lax.dynamic_update_slice(c_SxKxD, rows_PxKxD, (s, 0, 0))

    return jax.vmap(one)(cache_BxSxKxD, start_B, path_BxP)

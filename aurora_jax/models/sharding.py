"""Meshes and the placement of parameters and caches on them.

Every array carries a NamedSharding over a Mesh with axes ("dp", "tp"); a single device is a
1x1 mesh. Tensor parallelism follows Megatron-LM (Shoeybi et al. 2019): the q/k/v, gate and up
projections are split by output columns (so by attention heads and MLP units), o and down by
input rows, the embedding and lm_head by vocabulary. A dimension that does not divide by the
axis size stays replicated (for example 2 KV heads on a tp=8 mesh, as vLLM does).

In a multi-process job (aurora_jax/distributed.py) `jax.devices()` lists every process's
devices, so the default mesh spans all hosts; a mesh must hold devices of every process, or
the processes left out could neither run its steps nor read their results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Last two path components of a parameter -> partition of its dims.
_RULES: dict[tuple[str, str], tuple] = {
    ("q_proj", "kernel"): (None, "tp"),
    ("k_proj", "kernel"): (None, "tp"),
    ("v_proj", "kernel"): (None, "tp"),
    ("o_proj", "kernel"): ("tp", None),
    ("gate_proj", "kernel"): (None, "tp"),
    ("up_proj", "kernel"): (None, "tp"),
    ("down_proj", "kernel"): ("tp", None),
    ("lm_head", "kernel"): (None, "tp"),
}


def make_mesh(tp: int | None = None, dp: int = 1, devices=None) -> Mesh:
    """A ("dp", "tp") mesh; tp defaults to all devices not used by dp."""
    devices = list(devices if devices is not None else jax.devices())
    if tp is None:
        tp = len(devices) // dp
    if dp * tp > len(devices) or dp < 1 or tp < 1:
        raise ValueError(f"mesh dp={dp} x tp={tp} needs {dp * tp} devices, have {len(devices)}")
    chosen = devices[: dp * tp]
    missing = {d.process_index for d in devices} - {d.process_index for d in chosen}
    if missing:
        raise ValueError(f"mesh dp={dp} x tp={tp} leaves out the devices of processes "
                         f"{sorted(missing)}; a multi-process mesh needs all {len(devices)}")
    return Mesh(np.array(chosen).reshape(dp, tp), ("dp", "tp"))


def serving_mesh(tp: int = 1) -> Mesh | None:
    """The mesh a serving command loads onto: `tp` devices (None, the loaders' one-device
    default, for tp=1). In a multi-process job, every device of every process over the tp
    axis (tp=1 means all of them; a tp that leaves a process out is an error)."""
    if jax.process_count() > 1:
        return make_mesh(tp=tp if tp > 1 else None)
    return make_mesh(tp=tp) if tp > 1 else None


def _fit(mesh: Mesh, shape: tuple[int, ...], spec: tuple) -> P:
    """Drops axes from `spec` where the dimension does not divide by the axis size."""
    out = []
    for dim, axis in zip(shape, spec, strict=True):
        out.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_sharding(mesh: Mesh, path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of one parameter, chosen by its path in the model state."""
    key = (str(path[-2]), str(path[-1])) if len(path) >= 2 else ("", "")
    if path and str(path[-1]) == "embed":
        spec = ("tp", None)
    else:
        spec = _RULES.get(key, (None,) * len(shape))
    return NamedSharding(mesh, _fit(mesh, shape, spec))


def cache_sharding(mesh: Mesh, shape_BxKxSxD: tuple[int, ...]) -> NamedSharding:
    """KV cache [B, K, S, D]: batch over dp, kv heads over tp."""
    return NamedSharding(mesh, _fit(mesh, shape_BxKxSxD, ("dp", "tp", None, None)))


def state_path(keypath) -> tuple[str, ...]:
    """A jax key path into an nnx.State as plain names ('layers', '0', 'attn', ...)."""
    names = []
    for k in keypath:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        names.append(str(name))
    if names and names[-1] == "value":  # the Variable's own field
        names.pop()
    return tuple(names)


def shard_state(state, mesh: Mesh):
    """Places every leaf of a model state on `mesh` by the rules above."""

    def place(kp, x):
        return jax.device_put(x, param_sharding(mesh, state_path(kp), x.shape))

    return jax.tree_util.tree_map_with_path(place, state)


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def move(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` placed by `sharding`, by device-to-device copies only. `jax.device_put` does that
    itself when every shard the destination wants is whole on some source device (a
    replicated or one-device source, the same split on other devices); a shard that the
    source splits over several devices (a tp-sharded embedding going to a replicated learner)
    it would assemble on the host, so such an array is first assembled on one destination
    device from its shards. An array placed so already is returned as it is."""
    if x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    have = {_index_key(i) for i in x.sharding.devices_indices_map(x.shape).values()}
    want = {_index_key(i) for i in sharding.devices_indices_map(x.shape).values()}
    if want <= have:
        return jax.device_put(x, sharding)
    first = next(iter(sharding.devices_indices_map(x.shape)))  # its first device
    pieces: dict[tuple, jax.Array] = {}
    for shard in x.addressable_shards:
        key = _index_key(shard.index)
        if key not in pieces:
            pieces[key] = jax.device_put(shard.data, first)
    whole = _assemble(x.shape, tuple(pieces), tuple(pieces.values()))
    return jax.device_put(whole, sharding)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _assemble(shape: tuple[int, ...], keys: tuple, pieces: tuple[jax.Array, ...]) -> jax.Array:
    """The array of `shape` whose blocks at `keys` (slice triples) are `pieces`, all on one
    device (built there: no constant comes from the host)."""
    whole = jnp.zeros(shape, pieces[0].dtype)
    for key, piece in zip(keys, pieces, strict=True):
        whole = whole.at[tuple(slice(*k) for k in key)].set(piece)
    return whole


def move_tree(tree, sharding: jax.sharding.Sharding):
    """Every leaf of `tree` placed by `sharding` (device to device)."""
    return jax.tree.map(lambda x: move(x, sharding), tree)


def place_like(tree, reference):
    """`tree` placed leaf by leaf as `reference` (same structure) is placed: host (numpy)
    leaves put on the reference's shardings (in a multi-process job every process passes the
    same values), device arrays moved there device to device (`move`); `tree` itself if it is
    placed so already (shardings that place every shard alike count as the same)."""
    pairs = list(zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))
    if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(r.sharding, x.ndim)
           for x, r in pairs):
        return tree
    return jax.tree.map(lambda x, r: move(x, r.sharding) if isinstance(x, jax.Array)
                        else jax.device_put(x, r.sharding), tree, reference)

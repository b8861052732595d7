"""The online learner on devices of its own, apart from the serving devices (DESIGN.md, "Scale
and placement"), so that a learner step never waits for a serving step nor delays one.

A device spec names local devices by index, Python style: [6, 7] are the seventh and eighth,
[-1] is the last one; a bare count n (library callers only) means the last n. Serving takes
the first `tp` of the devices left over. The learner gets a ("dp", "tp") mesh over its devices
with tp 1: its training state and the target's frozen embedding and lm_head are replicated on
each of them, and every batch is split over dp where the batch size divides (data parallel;
XLA all-reduces the gradients).

Every crossing between the two device sets is a device-to-device copy, never a trip through
the host:
- once, at start: the draft to train and the target's embedding and lm_head, to the learner;
- at each publication: the learner's draft, to exactly the shardings of the draft the engine
  serves, so the engine's compiled steps take it as they are (the engine refuses any other
  sharding rather than recompile);
- at a rollback or a "better" comparison: a serving draft, to the learner.
Traces are the one exception: the engine fetches them to the host anyway (the trace buffer
cuts windows with numpy), and each batch goes from the host straight to the learner's devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aurora_jax.errors import ConfigError
from aurora_jax.models.sharding import make_mesh

DeviceSpec = int | Sequence[int]
"""Local devices by index (negative: from the end), or a count n: the last n."""


def check_spec(spec: Sequence[int] | None, key: str) -> None:
    """What a config can check of a device list before jax starts (the device count is only
    known then): not empty, no index twice. ConfigError naming `key` otherwise."""
    if spec is None:
        return
    if not spec:
        raise ConfigError(f"{key}: the list is empty (null: the learner shares the serving "
                          "devices)")
    twice = sorted({i for i in spec if list(spec).count(i) > 1})
    if twice:
        raise ConfigError(f"{key}: device index {twice[0]} is named twice")


def learner_devices(spec: DeviceSpec, devices: Sequence[jax.Device]) -> list[jax.Device]:
    """The devices of `devices` that `spec` names; ConfigError for an index out of range, a
    device named twice, or a spec that leaves no device to serve."""
    n = len(devices)
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"learner devices: a count must be >= 1, got {spec}")
        picks = list(range(n - spec, n))
    else:
        picks = [int(i) for i in spec]
        if not picks:
            raise ConfigError("learner devices: the list is empty (null shares the serving "
                              "devices)")
        bad = [i for i in picks if not -n <= i < n]
        if bad:
            raise ConfigError(f"learner devices: index {bad[0]} is out of range: there are {n} "
                              f"local devices (0 to {n - 1}, or -{n} to -1)")
        picks = [i % n for i in picks]
        if len(set(picks)) < len(picks):
            raise ConfigError(f"learner devices: {list(spec)} names a device twice")
    if len(picks) >= n:
        raise ConfigError(f"learner devices: {spec!r} takes all {n} local devices and leaves "
                          "none to serve")
    return [devices[i] for i in picks]


def split_meshes(spec: DeviceSpec, tp: int = 1,
                 devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """(serving mesh, learner mesh): the learner on the local devices `spec` names, serving
    tensor-parallel over the first `tp` of the others."""
    if jax.process_count() > 1:
        raise ConfigError("learner devices: a learner on devices of its own runs in a single-"
                          "process job; in a multi-process job run `aurora-jax learn --workdir`")
    devices = list(jax.local_devices() if devices is None else devices)
    learner = learner_devices(spec, devices)
    rest = [d for d in devices if d not in learner]
    if len(rest) < tp:
        raise ConfigError(f"learner devices: {spec!r} leaves {len(rest)} of the {len(devices)} "
                          f"local devices to serve; tp={tp} needs {tp}")
    serving = make_mesh(tp=tp, devices=rest[:tp])
    return serving, make_mesh(tp=1, dp=len(learner), devices=learner)


def check_apart(learner: Mesh, serving: Mesh) -> None:
    """ConfigError if the learner's mesh shares a device with the serving mesh."""
    shared = set(learner.devices.flat) & set(serving.devices.flat)
    if shared:
        ids = sorted(d.id for d in shared)
        raise ConfigError(f"learner devices overlap the serving devices: device ids {ids} are "
                          "in both meshes; a learner step there would stall serving")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """A learner batch (leading axis B) split over dp, or replicated if B does not divide."""
    dp = mesh.shape["dp"]
    return NamedSharding(mesh, P("dp") if batch_size % dp == 0 else P())


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


def like(tree, reference):
    """`tree` placed leaf by leaf as `reference` (same structure) is placed; `tree` itself if
    it is already (shardings that place every shard alike count as the same)."""
    if all(x.sharding.is_equivalent_to(r.sharding, x.ndim) for x, r in
           zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True)):
        return tree
    return jax.tree.map(lambda x, r: move(x, r.sharding), tree, reference)

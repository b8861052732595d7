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

from collections.abc import Sequence

import jax
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

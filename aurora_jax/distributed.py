"""Multi-host serving: the one place that starts `jax.distributed` and says who is primary.

Multi-controller JAX (one Python process per host, every process running the same program):
after `jax.distributed.initialize`, `jax.devices()` lists the devices of every process, so the
("dp", "tp") mesh of models/sharding.py spans all hosts and the target is split over all of
them. Each process must then issue the same jitted steps, with the same inputs, in the same
order: the host loop is deterministic (no timing-based decision may differ between processes)
and host inputs (prompts, slots, sampling settings) are the same numpy values everywhere, which
jit takes as replicated global inputs. Only the primary process (index 0) admits requests from
the outside and writes what a user sees (stdout, files, traces, drafts, HTTP); the others run
the same steps and keep quiet. What this rules out for now: a hot swap must land between the
same two steps in every process, so across processes `generate` serves a fixed draft, `run`
serves without its learner and with a fixed mode (no timing-driven adaptive policy), and
`learn` runs as one process (aurora_jax/cli.py checks all of this up front). A server's HTTP
requests and its learner process's drafts arrive at the primary alone: each loop iteration
it hands what it took in to the others (`broadcast_bytes`), and a draft is swapped in only
once every process has read it (`all_agree`; serve/lockstep.py).

When: only when configured (a `distributed:` section) or asked by the environment; otherwise
nothing here calls into `jax.distributed` and a process serves alone, exactly as before.
Environment variables fill the fields the config leaves null (the process id differs per
process, so it usually comes from there):

    AURORA_JAX_COORDINATOR_ADDRESS  or JAX_COORDINATOR_ADDRESS   host:port of process 0
    AURORA_JAX_NUM_PROCESSES        or JAX_NUM_PROCESSES         how many processes
    AURORA_JAX_PROCESS_ID           or JAX_PROCESS_ID            this process's index
    AURORA_JAX_DISTRIBUTED=auto     `jax.distributed.initialize()` with no arguments: TPU VMs,
                                    SLURM and Open MPI detect all three themselves

On CPU devices the cross-process collectives go through gloo (`cpu_collectives`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np

from aurora_jax.errors import ConfigError

log = logging.getLogger(__name__)

CpuCollectives = Literal["gloo", "mpi", "none"]

# (field, environment variables in order of precedence)
_ENV: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("coordinator_address", ("AURORA_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")),
    ("num_processes", ("AURORA_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")),
    ("process_id", ("AURORA_JAX_PROCESS_ID", "JAX_PROCESS_ID")),
)
AUTO_ENV = "AURORA_JAX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process JAX job (all null: it does not)."""

    coordinator_address: str | None = None
    """host:port where process 0 runs the coordinator, the same for every process (null: from
    the environment, or none)."""
    num_processes: int | None = None
    """Processes in the job (null: from the environment, or auto-detected)."""
    process_id: int | None = None
    """This process's index, 0 .. num_processes - 1; 0 is the primary (null: from the
    environment, or auto-detected)."""
    auto: bool = False
    """Call `jax.distributed.initialize()` with no arguments and let JAX find the cluster (TPU
    VMs, SLURM, Open MPI), even with nothing set here or in the environment."""
    cpu_collectives: CpuCollectives = "gloo"
    """Cross-process collectives between CPU devices (jax_cpu_collectives_implementation);
    "none" leaves JAX's default, which cannot run a CPU mesh across processes."""
    initialization_timeout_s: int = 300
    """Seconds to wait for every process to join before giving up."""

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ConfigError(f"distributed.process_id must be >= 0, got {self.process_id}")
        if (self.process_id is not None and self.num_processes is not None
                and self.process_id >= self.num_processes):
            raise ConfigError(f"distributed.process_id {self.process_id} is not below "
                              f"num_processes {self.num_processes}")
        if self.initialization_timeout_s < 1:
            raise ConfigError("distributed.initialization_timeout_s must be >= 1")

    @property
    def enabled(self) -> bool:
        """Whether this process joins a multi-process job."""
        return self.auto or self.coordinator_address is not None

    def with_env(self, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """This config with its null fields filled from the environment."""
        environ = os.environ if environ is None else environ
        fill: dict = {}
        for name, keys in _ENV:
            raw = next((environ[k] for k in keys if environ.get(k)), None)
            if getattr(self, name) is not None or raw is None:
                continue
            if name == "coordinator_address":
                fill[name] = raw
                continue
            try:
                fill[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{'/'.join(keys)} must be an integer, got {raw!r}") from None
        auto = environ.get(AUTO_ENV, "").strip().lower()
        if auto not in ("", "0", "auto", "1", "true"):
            raise ConfigError(f"{AUTO_ENV} must be 'auto' (or unset), got {auto!r}")
        if auto in ("auto", "1", "true"):
            fill["auto"] = True
        return dataclasses.replace(self, **fill)


HOST_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def child_xla_flags(devices: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """XLA_FLAGS for a process this one starts: this process's flags (compile settings, say)
    less any host device count, plus `devices` host devices where given (XLA's one
    otherwise)."""
    env = os.environ if environ is None else environ
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(HOST_DEVICE_COUNT)]
    if devices is not None:
        flags.append(f"{HOST_DEVICE_COUNT}={devices}")
    return " ".join(flags)


def initialize(cfg: DistributedConfig | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process job that `cfg` and the environment describe; returns whether
    this process is part of one. A no-op when nothing asks for it (or when JAX's distributed
    runtime is up already). Must run before anything else touches a JAX device."""
    cfg = (cfg or DistributedConfig()).with_env(environ)
    if not cfg.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    if cfg.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    log.info("joining a multi-process job: coordinator %s, process %s of %s",
             cfg.coordinator_address or "auto", cfg.process_id, cfg.num_processes)
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               initialization_timeout=cfg.initialization_timeout_s)
    return True


def is_primary() -> bool:
    """True in the process that admits requests and writes outputs (the only one, alone)."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def to_host(tree):
    """Host numpy copies of a pytree of arrays, on every process. A replicated or
    process-local array is read from this process's own copy; an array split across processes
    (a dp-sharded output) is gathered first, a collective every process must reach in turn."""

    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)  # (alone: every array is; one call starts all copies)

    def read(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(read, tree)


def broadcast_from_primary(tree):
    """The primary's values of a pytree of fixed-shape numpy arrays, on every process (a
    collective: every process calls it, in the same order). Alone, the tree itself."""
    if not is_multiprocess():
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


_LENGTH = 8  # bytes of the length prefix in `broadcast_bytes`' first buffer


def broadcast_bytes(data: bytes, chunk: int = 4096) -> bytes:
    """The primary's `data` on every process (a collective: every process calls it, in the same
    order; the others pass anything, b"" say). Alone, `data` itself. One broadcast of `chunk`
    bytes carries a length prefix and up to `chunk - 8` bytes; a longer message takes a second
    broadcast padded to a power of two, so that only a few buffer shapes ever compile."""
    if not is_multiprocess():
        return data
    head = np.zeros(chunk, np.uint8)
    n = len(data) if is_primary() else 0
    first = min(n, chunk - _LENGTH)
    head[:_LENGTH] = np.frombuffer(np.int64(n).tobytes(), np.uint8)
    if first:
        head[_LENGTH:_LENGTH + first] = np.frombuffer(data[:first], np.uint8)
    head = broadcast_from_primary(head)
    n = int(head[:_LENGTH].view(np.int64)[0])
    if n <= chunk - _LENGTH:
        return head[_LENGTH:_LENGTH + n].tobytes()
    rest = n - (chunk - _LENGTH)
    tail = np.zeros(1 << (rest - 1).bit_length(), np.uint8)
    if is_primary():
        tail[:rest] = np.frombuffer(data[chunk - _LENGTH:], np.uint8)
    tail = broadcast_from_primary(tail)
    return head[_LENGTH:].tobytes() + tail[:rest].tobytes()


def all_agree(flag: bool) -> bool:
    """Whether `flag` holds in every process (a collective: every process calls it, in the
    same order). Alone, `flag`."""
    if not is_multiprocess():
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([int(flag)], np.int32))
    return bool(np.asarray(flags).min())

"""The engine's programs compiled for TPU topologies (and H100 / H200 GPUs), on a host that
has neither.

`libtpu` (the `tpu` extra) carries the real XLA:TPU and Mosaic compilers, and
`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice as abstract
devices. With the default backend left on the CPU (`JAX_PLATFORMS=cpu`), a program lowered
with shape structs placed on a mesh of those devices compiles exactly as it would on the
slice, and the compiled program reports its memory (`memory_analysis`) and XLA's cost model
(`cost_analysis`). Nothing runs: this proves a program compiles and fits, not how fast it is.

The parameters are shape structs (no weights exist), placed by the project's own rules
(models/sharding.py); the programs are the engine's own jitted prefill, insert and step
functions (engine/engine.py), traced under the topology's mesh so that dispatch picks the
TPU kernel and wraps it in `shard_map` (pallas_kernels/dispatch.py). The online learner's
train step (learn/learner.py) compiles the same way, on chips of its own or beside serving.

GPUs (`h100:N`, `h200:N`) compile the same way with jax's CUDA plugin (the `gpu` extra),
which compiles for a device described to it (`GPU_TARGETS`) when none is present. XLA:GPU's
HLO names no memory spaces, so its HBM count is every fusion's operands and results.

Two counts of bytes. XLA's cost model ("bytes accessed") adds every instruction's operands
and results wherever they live, so a weight prefetched into on-chip memory counts twice, and
it does not see inside a Mosaic call. The HBM count (accelerators/hbm_traffic.py) reads the
compiled HLO instruction by instruction and counts only what crosses HBM, a Mosaic kernel's
HBM operands whole. `must_move` is what a step cannot avoid reading once: the weights (less
the embedding table, of which a step reads a few rows) and the live KV (every layer's keys
and values up to the context length).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aurora_jax.accelerators.decode import LLAMA_31_8B
from aurora_jax.accelerators.hbm_traffic import hbm_traffic
from aurora_jax.engine import step
from aurora_jax.engine.engine import Engine, cache_room
from aurora_jax.learn import placement
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, LearnerState, make_learner_step
from aurora_jax.learn.losses import LearnBatch, LossConfig
from aurora_jax.learn.online import OnlineConfig
from aurora_jax.learn.optimizer import OptimizerSettings, make_optimizer
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.eagle3 import DTYPES, Draft, DraftConfig, Eagle3Draft
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.sharding import cache_sharding, param_sharding, state_path
from aurora_jax.models.transformer import Target, Transformer
from aurora_jax.speculative.config import SpecConfig

GiB = 1 << 30


def _gpu_target(cores: int, memory: int, bandwidth: int, name: str) -> str:
    """XLA:GPU's description of a Hopper GPU (sm_90): what deviceless compilation reads
    instead of asking a device (a `GpuTargetConfigProto` in text form)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {cores}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


GPU_MEMORY = {"h100": 84_929_347_584, "h200": 150_754_820_096}
"""The memory each GPU reports to CUDA (H100 SXM 80 GB, H200 SXM 141 GB)."""

GPU_TARGETS = {
    "h100": _gpu_target(132, GPU_MEMORY["h100"], 3_352_320_000_000, "NVIDIA H100 80GB HBM3"),
    "h200": _gpu_target(132, GPU_MEMORY["h200"], 4_800_000_000_000, "NVIDIA H200"),
}
"""GPUs compiled for without one (the `gpu` extra's CUDA plugin): their memory, SM count and
memory bandwidth."""

HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB, **GPU_MEMORY}
"""High-bandwidth memory per chip, by TPU generation or GPU."""

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e|h100|h200):(\d+(?:x\d+){0,2})"
                       r"(?:/(?:dp(\d+))?x?(?:tp(\d+))?)?(?:\+learner(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice, or GPUs of one host, and the ("dp", "tp") mesh laid over its chips."""

    name: str
    """`generation:AxB[xC]`, as `get_topology_desc` names a TPU slice (v5e:2x2, v5p:1x1x1),
    or `h100:N` / `h200:N` for N GPUs of one host."""
    dp: int = 1
    """Data-parallel degree: the batch (and the cache's batch axis) split over dp groups."""
    tp: int = 1
    """Tensor-parallel degree: heads and MLP units split over tp chips."""
    learner: int = 0
    """Chips of the learner's own (`learner.devices`), after the serving dp * tp chips; the
    learner's batch is split over them. 0: the learner shares the serving chips."""

    @classmethod
    def parse(cls, text: str) -> Topology:
        """`v6e:2x2/tp4`, `v5e:2x2/dp2xtp2`, `v5e:1x1` (dp = tp = 1), `h100:1`, `h200:8/tp8`,
        or any of them with `+learnerN`: N more chips for the learner
        (`v5e:2x2/tp2+learner2`)."""
        m = _TOPOLOGY.match(text.strip())
        gen = m and m.group(1)
        if m is None or ("x" in m.group(2)) != (gen not in GPU_TARGETS):
            raise ValueError(f"topology {text!r}: expected GEN:AxB[xC][/dpNxtpM][+learnerL] "
                             f"for a TPU slice, GPU:N[/dpNxtpM][+learnerL] for N GPUs, with "
                             f"GEN one of {sorted(set(HBM_BYTES) - set(GPU_TARGETS))} and GPU "
                             f"one of {sorted(GPU_TARGETS)} (e.g. v6e:2x2/tp4, h100:1)")
        gen, dims, dp, tp, learner = m.groups()
        topo = cls(f"{gen}:{dims}", int(dp or 1), int(tp or 1), int(learner or 0))
        need = topo.dp * topo.tp + topo.learner
        if need > topo.chips:
            raise ValueError(f"topology {text!r}: dp={topo.dp} x tp={topo.tp}"
                             + (f" + {topo.learner} learner chips" if topo.learner else "")
                             + f" needs {need} chips, the slice has {topo.chips}")
        return topo

    @property
    def generation(self) -> str:
        return self.name.split(":")[0]

    @property
    def chips(self) -> int:
        return int(np.prod([int(d) for d in self.name.split(":")[1].split("x")]))

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    def __str__(self) -> str:
        return f"{self.name}/dp{self.dp}xtp{self.tp}" + (
            f"+learner{self.learner}" if self.learner else "")

    def mesh(self) -> Mesh:
        """The serving mesh over the slice's abstract devices (the first dp * tp chips)."""
        devices = self._devices()[: self.dp * self.tp]
        return Mesh(devices.reshape(self.dp, self.tp), ("dp", "tp"))

    def learner_mesh(self) -> Mesh | None:
        """The learner's own ("dp", "tp") mesh, its `learner` chips along dp, as
        `learn/placement.split_meshes` lays it; None where it shares the serving chips."""
        if not self.learner:
            return None
        start = self.dp * self.tp
        devices = self._devices()[start: start + self.learner]
        return Mesh(devices.reshape(self.learner, 1), ("dp", "tp"))

    @property
    def is_gpu(self) -> bool:
        return self.generation in GPU_TARGETS

    def _devices(self) -> np.ndarray:
        from jax.experimental import topologies

        if self.is_gpu:  # the CUDA plugin's compiler, told the device instead of asking one
            desc = topologies.get_topology_desc(
                platform="cuda", target_config=GPU_TARGETS[self.generation],
                topology=f"1x1x{self.chips}")
            return np.array(desc.devices)

        # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU. On a
        # host with no TPU chips only the compilers are used, and a second compiling process
        # (a test beside a running check, say) is safe: let it in.
        if not any(Path("/dev").glob("accel*")) and not Path("/dev/vfio").exists():
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        kwargs = {"chips_per_host_bounds": (1, 1, 1)} if self.chips == 1 else {}
        desc = topologies.get_topology_desc(topology_name=self.name, platform="tpu", **kwargs)
        return np.array(desc.devices)


def _compiler_available(module: str, missing: str, probe: str, what: str) -> str | None:
    """None when `module` imports and the topology `probe` can be described, else why not."""
    try:
        importlib.import_module(module)
    except ImportError:
        return missing
    try:
        Topology(probe).mesh()
    except Exception as e:  # noqa: BLE001 (any failure: say it)
        return f"no {what} could be described ({type(e).__name__}: {e})"
    return None


def tpu_compiler_available() -> str | None:
    """None when TPU programs can be compiled here, else why not."""
    return _compiler_available("libtpu", "libtpu is not installed (pip install -e '.[tpu]')",
                               "v5e:1x1", "TPU topology")


def gpu_compiler_available() -> str | None:
    """None when GPU programs can be compiled here (with no GPU: the CUDA plugin's compiler,
    the default backend left on the CPU), else why not."""
    return _compiler_available(
        "jax_plugins.xla_cuda12", "jax's CUDA plugin is not installed (pip install -e '.[gpu]')",
        "h100:1", "GPU")


def _shape(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_target(cfg: TargetConfig, dtype: str, mesh: Mesh) -> Target:
    """A target of `cfg`'s shapes whose parameters are shape structs placed on `mesh`."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))))
    state = jax.tree_util.tree_map_with_path(
        lambda kp, x: _shape(x, param_sharding(mesh, state_path(kp), x.shape)), state)
    return Target(cfg, graphdef, state, mesh, dtype)


def abstract_draft(cfg: DraftConfig, dtype: str, mesh: Mesh) -> Draft:
    """An EAGLE-3 draft of `cfg`'s shapes, replicated on `mesh` as `init_draft` places it."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Eagle3Draft(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))))
    replicated = NamedSharding(mesh, P())
    return Draft(cfg, graphdef, jax.tree.map(lambda x: _shape(x, replicated), state))


def _abstract(tree, mesh: Mesh):
    """Every array of `tree` as a shape struct: one already placed keeps its sharding, a
    host value (tokens, lengths, sampling settings) is replicated on `mesh`."""
    replicated = NamedSharding(mesh, P())

    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.ShapeDtypeStruct) and isinstance(sharding, NamedSharding):
            return x
        return _shape(x, replicated)

    return jax.tree.map(one, tree)


def decode_state(engine: Engine) -> step.DecodeState:
    """The engine's decode state as shape structs: the target's cache split as
    `cache_sharding` says, everything else replicated."""
    target, cfg = engine.target, engine.target.cfg
    shape = KVCache.shape(cfg, engine.max_slots, engine.cache_size)
    sharding = cache_sharding(target.mesh, shape)
    state = jax.eval_shape(lambda: step.init_state(
        cfg, None if engine.draft is None else engine.draft.cfg, engine.spec, engine.max_slots,
        engine.cache_size, target.dtype, engine.seed))
    state = _abstract(state, target.mesh)
    cache = jax.tree.map(lambda x: _shape(x, sharding), state.cache)
    return dataclasses.replace(state, cache=cache)


CompileFn = Callable[[str, Callable, tuple], "jax.stages.Compiled | None"]


def compile_engine_programs(engine: Engine, prompt_lens: tuple[int, ...],
                            compile_fn: CompileFn) -> None:
    """Hands `compile_fn(name, jitted, abstract args)` what `Engine.precompile` compiles:
    prefill and insert for a group of max_slots prompts at each prompt length, then the step
    (insert is skipped where prefill did not compile: its arguments are prefill's output)."""
    state = decode_state(engine)
    mesh = engine.target.mesh
    key = jax.random.key(engine.seed)
    b = engine.max_slots
    for t in prompt_lens:
        args = engine._prefill_args(np.zeros((b, t), np.int32), np.ones((b,), np.int32), key, [])
        prefill = compile_fn(f"prefill b{b} t{t}", engine._prefill, _abstract(args, mesh))
        if prefill is not None:
            prefix = jax.tree.map(lambda x: _shape(x, x.sharding), prefill.out_info)
            args = engine._insert_args(prefix, state, list(range(b)), [1] * b, [])
            compile_fn(f"insert b{b} t{t}", engine._insert, _abstract(args, mesh))
    dgraph = engine.draft and engine.draft.graphdef
    dstate = None if engine.draft is None else engine.draft.state
    args = (engine.target.graphdef, engine.target.state, dgraph, dstate, state, engine.eos)
    compile_fn("generate", engine._generate, _abstract(args, mesh))


def learner_step_program(target: Target, spec: SpecConfig, learner: Mesh | None,
                         online: OnlineConfig | None = None, loss: LossConfig | None = None,
                         optimizer: OptimizerSettings = DEFAULT_OPTIMIZER):
    """(the learner's jitted train step, its arguments as shape structs) for the draft of an
    abstract target (`abstract_target`), placed as `Learner` places them: on a mesh of its
    own (`learner`), its state and the target's embedding and lm_head replicated there and
    each batch split over its dp axis; sharing the serving mesh (None), the draft's state
    where the engine keeps it (replicated), the embedding and lm_head where the target keeps
    them, the batch replicated. The batch is `online`'s (B windows of T positions, up to
    `trees_per_seq` trees of `spec`'s nodes + 1 each), in the float32 the trace buffer
    collates (None: the defaults, `OnlineConfig()` and `LossConfig()`)."""
    online, loss = online or OnlineConfig(), loss or LossConfig()
    cfg, dt = target.cfg, DTYPES[target.dtype]
    mesh = learner if learner is not None else target.mesh
    replicated = NamedSharding(mesh, P())
    draft_cfg = DraftConfig.for_target(cfg)
    module = nnx.eval_shape(lambda: Eagle3Draft(draft_cfg, dtype=dt, rngs=nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    params, buffers = jax.tree.map(lambda x: _shape(x, replicated), (params, buffers))
    tx = make_optimizer(optimizer)
    step_fn = make_learner_step(graphdef, tx, loss)
    state = jax.eval_shape(lambda p: LearnerState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                           params)
    state = jax.tree.map(lambda x: _shape(x, replicated), state)
    placed = {state_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(target.state)}
    embed = placed[("embed",)]  # as the target places it
    head = (jax.ShapeDtypeStruct(embed.shape[::-1], embed.dtype, sharding=NamedSharding(
                target.mesh, P(*reversed(embed.sharding.spec))))  # head_kernel(): embed.T
            if cfg.tie_word_embeddings else placed[("lm_head", "kernel")])
    if learner is not None:  # copied to the learner's chips, whole on each
        embed, head = _shape(embed, replicated), _shape(head, replicated)
    h = cfg.hidden_size
    b, t, n, k = online.batch_size, online.seq_len, online.trees_per_seq, spec.nodes + 1
    at = (placement.batch_sharding(mesh, b) if learner is not None else replicated)
    f32, i32 = jnp.float32, jnp.int32
    shapes = dict(tokens=((b, t), i32), aux=((b, t, len(draft_cfg.aux_layers), h), f32),
                  target_hidden=((b, t, h), f32), length=((b,), i32),
                  tree_tokens=((b, n, k), i32), tree_parent=((b, n, k), i32),
                  tree_hidden=((b, n, k, h), f32), tree_accepted=((b, n, k), jnp.bool_),
                  tree_root_pos=((b, n), i32), tree_valid=((b, n), jnp.bool_))
    structs = {name: jax.ShapeDtypeStruct(shape, dtype_, sharding=at)
               for name, (shape, dtype_) in shapes.items()}
    batch = LearnBatch(**structs)  # type: ignore[arg-type]  # shape structs, not arrays
    return step_fn, (state, buffers, embed, head, batch)


def _per_device_bytes(x) -> int:
    """Bytes of one device's shard of a placed shape struct."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize


def must_move_bytes(engine: Engine, context: int) -> int:
    """What one target-only decode step cannot avoid reading on one chip: its shard of the
    weights (less the embedding table, of which a step reads B rows; a tied embedding is the
    lm_head too and counts) and of every layer's keys and values for max_slots sequences of
    `context` tokens."""
    target, cfg = engine.target, engine.target.cfg
    weights = sum(_per_device_bytes(x)
                  for path, x in jax.tree_util.tree_leaves_with_path(target.state)
                  if "embed" not in jax.tree_util.keystr(path) or cfg.tie_word_embeddings)
    shape = KVCache.shape(cfg, engine.max_slots, context)
    kv = jax.ShapeDtypeStruct(shape, jnp.dtype(target.dtype),
                              sharding=cache_sharding(target.mesh, shape))
    return weights + 2 * cfg.num_layers * _per_device_bytes(kv)


_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\w+)\[([\d,]*)\]"
                     r"(?:\{[^}]*\})?\s+([\w\-]+)\(")
RELAYOUT_OPS = ("copy", "copy-start", "transpose", "reshape")
"""HLO ops that move an array's elements to a new layout (a bitcast is free and not one)."""


def relayouts(hlo_text: str, elements: int) -> list[str]:
    """The instructions of an optimized HLO module (`Compiled.as_text()`, fused computations
    included) that copy, transpose or reshape an array of exactly `elements` elements: with
    one layer's KV cache shard, a relayout of the cache (whatever shape it is given, such as
    [B, S, K * D]) that a program pays at every call. (An array of another kind with as many
    elements would be counted too: choose shapes where none has.)"""
    found = []
    for line in hlo_text.splitlines():
        m = _HLO_OP.match(line)
        if m and m.group(3) in RELAYOUT_OPS:
            dims = [int(x) for x in m.group(2).split(",") if x]
            if int(np.prod(dims)) == elements:
                found.append(line.strip())
    return found


def cache_relayouts(engine: Engine, compiled: jax.stages.Compiled) -> list[str]:
    """`relayouts` of a compiled engine program, of arrays as large as one layer's cache
    shard (the target's; the draft's, where its heads and head dim are the same)."""
    cfg = engine.target.cfg
    shape = KVCache.shape(cfg, engine.max_slots, engine.cache_size)
    shard = cache_sharding(engine.target.mesh, shape).shard_shape(shape)
    return relayouts(compiled.as_text() or "", int(np.prod(shard)))


def compile_report(compiled: jax.stages.Compiled) -> dict:
    """Peak memory, flops, bytes accessed and XLA's estimated seconds of a compiled program
    (None where the backend does not say), and its HBM traffic counted from its HLO."""
    row: dict = {}
    try:
        traffic = hbm_traffic(compiled.as_text() or "")
    except (ValueError, KeyError, IndexError) as e:  # HLO the reader does not know
        row["hbm_traffic_error"] = f"{type(e).__name__}: {e}"
    else:
        row["hbm_traffic_bytes"] = traffic.total
        if traffic.unknown_trip_counts:  # loops counted once: the count is a lower bound
            row["loops_of_unknown_trip_count"] = traffic.unknown_trip_counts
    mem = compiled.memory_analysis()
    if mem is not None:
        row["peak_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0) or (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes))
        row["argument_bytes"] = int(mem.argument_size_in_bytes)
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    if cost:
        row["flops"] = float(cost.get("flops", 0.0))
        row["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
        seconds = float(cost.get("optimal_seconds", -1.0))
        if seconds >= 0:  # negative where the cost model has no estimate
            row["estimated_s"] = seconds
    return row


MODELS: dict[str, TargetConfig] = {
    "llama3.1-8b": LLAMA_31_8B,
    "qwen3-8b": TargetConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, family="qwen3", rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, eos_token_ids=(151645, 151643)),
    "smollm2-135m": TargetConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, eos_token_ids=(2, 0)),
    "tiny": TargetConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
        num_kv_heads=4, head_dim=128, max_position_embeddings=4096, eos_token_ids=(0,)),
}
"""The shapes compiled (published configs; no weights are needed): the 8B targets of
configs/, the built-in SmolLM2, and a two-layer model with TPU-tileable heads for tests."""

SPECS = {"off": SpecConfig(mode="off"), "chain": SpecConfig(mode="chain", depth=4),
         "tree": SpecConfig(mode="tree"), "ngram": SpecConfig(mode="ngram", depth=4)}


def engine_for(cfg: TargetConfig, attention: str, spec: SpecConfig, topo_mesh: Mesh, batch: int,
               cache_size: int, dtype: str) -> Engine:
    """An engine over abstract weights whose cache holds exactly `cache_size` slots."""
    cfg = dataclasses.replace(cfg, attention=attention)
    target = abstract_target(cfg, dtype, topo_mesh)
    draft = (abstract_draft(DraftConfig.for_target(cfg), dtype, topo_mesh)
             if spec.needs_draft else None)
    return Engine(target, draft, spec, max_slots=batch, max_len=cache_size - cache_room(spec))


_HBM_OOM = re.compile(r"RESOURCE_EXHAUSTED.*(?:out of memory|OutOfMemory|HbmOom).*hbm",
                      re.IGNORECASE)
"""The first line of XLA:TPU's error for a program whose memory exceeds the chip's HBM, in
either of its forms ("Ran out of memory on HBM, the total memory required for HLO
temporaries ...", "CompileTimeHbmOom ... Ran out of memory in memory space hbm")."""


def compile_program(fn, args, mesh: Mesh) -> tuple[jax.stages.Compiled | None, dict]:
    """`fn` lowered for `args` under `mesh` and compiled: (the program or None, its report,
    or the compiler's error verbatim, with `fits` False where the compiler ran out of HBM)."""
    t0 = time.perf_counter()
    # Nothing is written to the persistent compilation cache: a TPU program cannot be loaded
    # on this host (its entry would only raise a warning when read back), and the cache is
    # for the programs this host runs.
    min_s = jax.config.jax_persistent_cache_min_compile_time_secs  # type: ignore[attr-defined]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 (reported verbatim)
        error = f"{type(e).__name__}: {e}"
        report = {"compiled": False, "error": error,
                  "compile_s": round(time.perf_counter() - t0, 1)}
        if _HBM_OOM.search(error.splitlines()[0]):
            report["fits"] = False  # the compiler itself refused it for want of HBM
        return None, report
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    return compiled, {"compiled": True, **compile_report(compiled),
                      "compile_s": round(time.perf_counter() - t0, 1)}


def check_engine(model: str, topo: Topology, mesh: Mesh, attention: str, mode: str,
                 batch: int, context: int, prompt_lens: tuple[int, ...],
                 dtype: str = "bfloat16") -> list[dict]:
    """One row per program of one engine setting (see the module docstring)."""
    engine = engine_for(MODELS[model], attention, SPECS[mode], mesh, batch, context, dtype)
    base = dict(model=model, topology=str(topo), attention=attention, spec=mode, batch=batch,
                context=context, hbm_bytes=topo.hbm_bytes)
    rows = []

    def compile_fn(name, fn, args):
        compiled, report = compile_program(fn, args, mesh)
        row = dict(base, program=name, **report)
        if compiled is not None:
            row["fits"] = row.get("peak_bytes", 0) <= topo.hbm_bytes
        if compiled is not None and name == "generate":
            row["must_move_bytes"] = must_move_bytes(engine, context)
            if row.get("bytes_accessed"):
                row["accessed_over_must_move"] = row["bytes_accessed"] / row["must_move_bytes"]
            if "hbm_traffic_bytes" in row:
                row["traffic_over_must_move"] = row["hbm_traffic_bytes"] / row["must_move_bytes"]
        rows.append(row)
        return compiled

    compile_engine_programs(engine, prompt_lens, compile_fn)
    return rows


def check_learner(model: str, topo: Topology, mesh: Mesh, mode: str,
                  online: OnlineConfig | None = None, dtype: str = "bfloat16"
                  ) -> tuple[dict, jax.stages.Compiled | None]:
    """(the row, the program or None) of the learner's train step for the draft of `model`
    behind `mode`'s engine, on the learner's own chips of `topo` or sharing `mesh` (the
    serving chips). Sharing them, it fits only if its peak and the target's weights it does
    not take as arguments (all but the embedding and lm_head: `serving_weight_bytes`) fit
    together; the serving programs' own working memory is not counted."""
    learner, online = topo.learner_mesh(), online or OnlineConfig()
    target = abstract_target(MODELS[model], dtype, mesh)
    fn, args = learner_step_program(target, SPECS[mode], learner, online)
    compiled, report = compile_program(fn, args, learner if learner is not None else mesh)
    row = dict(model=model, topology=str(topo), attention="-", spec=mode,
               batch=online.batch_size, context=online.seq_len, hbm_bytes=topo.hbm_bytes,
               program=f"learner step b{online.batch_size} t{online.seq_len}", **report)
    if compiled is not None:
        if learner is None:  # the target's other weights stay on the shared chips
            row["serving_weight_bytes"] = sum(
                _per_device_bytes(x) for path, x in jax.tree_util.tree_leaves_with_path(
                    target.state)
                if not re.search(r"embed|lm_head", jax.tree_util.keystr(path)))
        row["fits"] = row.get("peak_bytes", 0) + row.get("serving_weight_bytes", 0) \
            <= topo.hbm_bytes
    return row, compiled


DEFAULT_TOPOLOGIES = ("v5e:1x1", "v6e:1x1", "v5p:1x1x1", "v6e:2x2/tp4", "v5e:2x2/dp2xtp2")


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (bytes in GB, XLA's estimate in microseconds)."""
    head = ("| model | topology | attention | spec | B | S | program | compiled | peak GB / HBM "
            "| HBM traffic GB (/ must move) | XLA accessed / must move | GFLOP | XLA est. us |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if not r["compiled"]:
            why = r["error"].splitlines()[0][:120].replace("|", "/")
            verdict = ("no, does not fit: " if r.get("fits") is False else "no: ") + why
        else:
            verdict = "yes" if r.get("fits", True) else "yes, does not fit"
        ratio = r.get("accessed_over_must_move")
        traffic = r.get("hbm_traffic_bytes")
        counted = "" if traffic is None else f"{traffic / 1e9:.2f}" + (
            f" ({r['traffic_over_must_move']:.3f}x)" if "traffic_over_must_move" in r else "")
        serving = r.get("serving_weight_bytes")  # a learner sharing the serving chips
        beside = "" if serving is None else f" + {serving / 1e9:.2f} serving"
        est = r.get("estimated_s")
        lines.append(
            f"| {r['model']} | {r['topology']} | {r['attention']} | {r['spec']} | {r['batch']} "
            f"| {r['context']} | {r['program']} | {verdict} "
            f"| {r.get('peak_bytes', 0) / 1e9:.2f}{beside} / {r['hbm_bytes'] / 1e9:.1f} "
            f"| {counted} | {'' if ratio is None else f'{ratio:.2f}x'} "
            f"| {r.get('flops', 0) / 1e9:.1f} | {'' if est is None else f'{est * 1e6:.0f}'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="tpu_compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.1-8b", choices=sorted(MODELS))
    ap.add_argument("--topology", nargs="+", default=list(DEFAULT_TOPOLOGIES),
                    help="GEN:AxB[xC][/dpNxtpM] or h100:N / h200:N, e.g. v6e:2x2/tp4")
    ap.add_argument("--attention", nargs="+", default=["pallas", "reference"],
                    choices=["pallas", "reference"])
    ap.add_argument("--spec", nargs="*", default=["off", "tree"], choices=sorted(SPECS),
                    help="engine settings compiled; given with no value, none (the learner "
                         "step alone)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--context", nargs="+", type=int, default=[2048],
                    help="cache slots per sequence (a multiple of 64)")
    ap.add_argument("--prompt-len", nargs="*", type=int, default=[128, 1024],
                    help="prefill buckets compiled (with insert), once per topology/attention; "
                         "given with no value, the step alone is compiled")
    ap.add_argument("--learner", default="tree", choices=["tree", "chain", "none"],
                    help="compile the online learner's train step once per topology, for the "
                         "draft of this spec's trees (on the topology's +learnerN chips, or "
                         "sharing the serving chips); none: skip it")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="bench_results/tpu_compile")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Compiles every combination asked for; writes <out>/tpu_compile.{json,md}, again after
    each setting, so that a long run stopped part way keeps every row it made."""
    import itertools
    import json
    import os
    from pathlib import Path

    from tqdm import tqdm

    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    topologies = [Topology.parse(t) for t in args.topology]
    for kind, available in (("TPU", tpu_compiler_available), ("GPU", gpu_compiler_available)):
        if any(t.is_gpu == (kind == "GPU") for t in topologies) and (why := available()):
            raise SystemExit(f"tpu_compile_check: cannot compile for a {kind}: {why}")
    combos = list(itertools.product(topologies, args.attention, args.spec, args.batch,
                                    args.context))
    rows: list[dict] = []
    meshes: dict[str, Mesh] = {}
    first: set[tuple] = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "tpu_compile.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                         indent=1))
        (out / "tpu_compile.md").write_text(markdown(rows))

    for topo, attention, mode, batch, context in tqdm(combos, desc="compiling", unit="setting"):
        mesh = meshes.setdefault(str(topo), topo.mesh())
        lens = () if (str(topo), attention) in first else tuple(args.prompt_len)
        first.add((str(topo), attention))
        for row in check_engine(args.model, topo, mesh, attention, mode, batch, context, lens,
                                args.dtype):
            rows.append(row)
            tqdm.write(f"{row['topology']} {attention} {mode} B{batch} S{context} "
                       f"{row['program']}: " + ("ok" if row["compiled"] else row["error"][:200]))
        save()
    if args.learner != "none":
        for topo in tqdm(topologies, desc="learner step", unit="topology"):
            row, _ = check_learner(args.model, topo, meshes.setdefault(str(topo), topo.mesh()),
                                   args.learner, dtype=args.dtype)
            rows.append(row)
            tqdm.write(f"{row['topology']} {row['program']}: "
                       + ("ok" if row["compiled"] else row["error"][:200]))
            save()
    save()
    print(markdown(rows))
    print(f"wrote {out / 'tpu_compile.json'} and {out / 'tpu_compile.md'}")
    return rows

"""Decode-step time of a model against its memory floor, and engine parity with the CPU.

Floor: a decode step at small batch is memory-bound. It must read every target weight once
(the embedding table aside: a step gathers only B of its rows) and the visible KV cache, so
no step can take less than those bytes over the device's copy bandwidth (probe.py). The
table reports each setting's measured step time, that floor, and the share of it reached.
Speculative settings read the draft's weights once per draft step as well; their column
"vs off" is the step's cost in target-only steps, which is the acceptance length above
which speculating pays (the break-even tau).

Steps are timed on slots filled to a fixed context (`context` committed tokens, cache
contents left at zero: attention costs the same), greedy, through the engine's own compiled
`generate` program, dispatched back to back as the serving loop does (it reads each step's
result one step late), so the time is the device's and not the host's.

Parity: the same greedy requests through the engine on the accelerator and on the host CPU
(float32, matmuls at "highest" precision on both), token for token.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.models.config import RopeScaling, TargetConfig
from aurora_jax.models.eagle3 import Draft, DraftConfig, init_draft
from aurora_jax.models.sharding import make_mesh, shard_state
from aurora_jax.models.transformer import Target, init_random
from aurora_jax.speculative.config import SpecConfig

LLAMA_31_8B = TargetConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
    eos_token_ids=(128009,))
"""Llama-3.1-8B's shapes (random weights: nothing is downloaded)."""

TINY_8B = dataclasses.replace(LLAMA_31_8B, vocab_size=1024, hidden_size=128,
                              intermediate_size=448, num_layers=4, num_heads=4, num_kv_heads=1,
                              head_dim=32)
"""The same architecture at CPU size, for `--small`."""


def random_pair(cfg: TargetConfig, dtype: str, draft_vocab: int | None, device,
                seed: int = 0) -> tuple[Target, Draft | None]:
    """A random target (and a random EAGLE-3 draft over the first `draft_vocab` target ids,
    if given), built on `device` and placed there (a 1x1 mesh). jax's random numbers do not
    depend on the device, but build on one device and copy with `on_devices` where two
    devices must hold the very same weights."""
    mesh = make_mesh(tp=1, devices=[device])
    with jax.default_device(device):
        graphdef, state = init_random(cfg, seed=seed, dtype=jnp.dtype(dtype))
        target = Target(cfg, graphdef, shard_state(state, mesh), mesh, dtype)
        if draft_vocab is None:
            return target, None
        ids = np.arange(min(draft_vocab, cfg.vocab_size))
        dcfg = DraftConfig.for_target(cfg, draft_vocab_size=len(ids))
        return target, init_draft(dcfg, seed=seed + 1, dtype=dtype, draft_to_target=ids,
                                  mesh=mesh)


def weight_bytes(state, skip_embedding: bool = True) -> int:
    """Bytes of every array in a model state (less the token embedding table)."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return sum(x.nbytes for path, x in leaves
               if not (skip_embedding and "embed" in jax.tree_util.keystr(path)))


def kv_bytes(cfg: TargetConfig, batch: int, context: int, itemsize: int) -> int:
    """Bytes of keys and values a step reads for `batch` sequences of `context` tokens."""
    return 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * itemsize


def filled_state(engine: Engine, context: int):
    """A decode state whose every slot is active with `context` committed tokens and an
    unbounded token budget (greedy)."""
    b = engine.max_slots
    state = engine.init_decode_state()
    full = lambda v: jnp.full((b,), v, jnp.int32)  # noqa: E731 (fresh buffers: donated)
    return dataclasses.replace(state, active=jnp.ones((b,), bool), cache_len=full(context),
                               draft_len=full(context - 1), root=full(1),
                               max_new=full(1 << 30))


def step_time(engine: Engine, context: int, steps: int) -> tuple[float, float]:
    """(median seconds per step over `steps` back-to-back steps, repeated 3 times;
    compile seconds)."""
    state = filled_state(engine, context)
    compile_before = engine.compile_s
    state, out = engine.generate(state)  # compiles
    jax.block_until_ready(out.tokens)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = engine.generate(state)
        jax.block_until_ready(out.tokens)
        runs.append((time.perf_counter() - t0) / steps)
    return sorted(runs)[1], engine.compile_s - compile_before


def decode_rows(target: Target, draft: Draft | None, specs: dict[str, SpecConfig],
                batches: list[int], *, context: int, steps: int, copy_bw: float,
                deadline: float = float("inf"), on_row=None) -> list[dict]:
    """One row per (batch, setting): step milliseconds, compile seconds, the memory floor
    (weights, and weights plus KV) and the step's cost in target-only steps. Settings are
    measured in the order given, batch by batch, until `deadline` (time.monotonic())."""
    itemsize = jnp.dtype(target.dtype).itemsize
    w_bytes = weight_bytes(target.state)
    d_bytes = 0 if draft is None else weight_bytes(draft.state)
    rows: list[dict] = []
    for b in batches:
        off_ms = None
        for name, spec in specs.items():
            if time.monotonic() > deadline:
                return rows
            engine = Engine(target, draft if spec.needs_draft else None, spec, max_slots=b,
                            max_len=context + steps * 4 * (spec.max_depth + 1) + 64, eos_ids=())
            step_s, compile_s = step_time(engine, context, steps)
            floor_w = w_bytes / copy_bw
            floor_kv = (w_bytes + kv_bytes(target.cfg, b, context, itemsize)) / copy_bw
            ms = step_s * 1e3
            if name == "off":
                off_ms = ms
            rows.append({
                "batch": b, "spec": name, "nodes": spec.nodes, "context": context,
                "step_ms": round(ms, 3), "compile_s": round(compile_s, 1),
                "floor_weights_ms": round(floor_w * 1e3, 3),
                "floor_weights_kv_ms": round(floor_kv * 1e3, 3),
                "pct_of_floor": round(100 * floor_kv * 1e3 / ms, 1),
                "draft_weight_gb": round(d_bytes / 1e9, 3) if spec.needs_draft else 0.0,
                "vs_off": round(ms / off_ms, 3) if off_ms else None,
                "target_tokens_per_s": round(b / step_s, 1) if name == "off" else None})
            if on_row is not None:
                on_row(rows[-1])
            del engine
    return rows


def greedy_outputs(target: Target, draft: Draft | None, spec: SpecConfig,
                   prompts: list[list[int]], new_tokens: int, device) -> list[list[int]]:
    """Greedy outputs of an engine serving `prompts` on `device` (stop tokens ignored)."""
    with jax.default_device(device):
        engine = Engine(target, draft if spec.needs_draft else None, spec,
                        max_slots=len(prompts),
                        max_len=max(map(len, prompts)) + new_tokens + 8, eos_ids=())
        run = engine.run([Request(p, new_tokens) for p in prompts])
    return [r.token_ids for r in run.results]


def on_devices(target: Target, draft: Draft | None, devices) -> tuple[Target, Draft | None]:
    """The same weights placed on another device set (one device here)."""
    mesh = make_mesh(tp=1, devices=list(devices))
    t = Target(target.cfg, target.graphdef, shard_state(target.state, mesh), mesh, target.dtype)
    if draft is None:
        return t, None
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return t, Draft(draft.cfg, draft.graphdef, jax.device_put(draft.state, rep))


def parity_rows(target: Target, draft: Draft | None, specs: dict[str, SpecConfig],
                prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Greedy outputs on the default device against the host CPU, per setting, float32 at
    "highest" matmul precision on both: tokens equal, and where the first difference is."""
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rows = []
    with jax.default_matmul_precision("highest"):
        t_cpu, d_cpu = on_devices(target, draft, [cpu])
        t_acc, d_acc = on_devices(target, draft, [accel])
        reference = greedy_outputs(t_cpu, d_cpu, SpecConfig(mode="off"), prompts, new_tokens,
                                   cpu)
        for name, spec in specs.items():
            if spec.needs_draft and draft is None:
                continue
            got = greedy_outputs(t_acc, d_acc, spec, prompts, new_tokens, accel)
            first = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b),
                          None) for g, r in zip(got, reference, strict=True)]
            rows.append({"spec": name, "sequences": len(prompts), "new_tokens": new_tokens,
                         "equal": sum(f is None for f in first),
                         "first_difference": [f for f in first if f is not None]})
    return rows

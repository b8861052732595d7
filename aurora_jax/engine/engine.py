"""The serving engine: fixed slots, continuous batching, speculative decoding, hot swap.

The API follows JetStream's Engine (`init_decode_state`, `prefill`, `insert`, `generate`);
each is a pure function from engine/step.py, compiled ahead of time once per shape bucket
(`lower().compile()`; `compilations` counts them, so a test or a server can check that
nothing recompiles after warm-up). `run` serves a list of requests with a `Batcher`
(engine/batcher.py), the host loop: admit queued requests into free slots, step all slots,
read each step's results one step late so the device never waits for the host. `set_draft`
replaces the draft params between steps (same structure, so nothing recompiles); its one
caller is the draft channel (engine/channel.py), which every new draft goes through. With
`SpecConfig(mode="off")` the same engine decodes with the target alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.engine import step
from aurora_jax.engine.batcher import Batcher, Request, RequestResult, acceptance_length
from aurora_jax.engine.trace import TraceEmitter
from aurora_jax.errors import ConfigError, PromptError
from aurora_jax.models.eagle3 import Draft, check_fits, same_layout
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.sharding import cache_sharding
from aurora_jax.models.transformer import Target
from aurora_jax.sampling import SamplingParams, SamplingRows
from aurora_jax.speculative.config import SpecConfig


@dataclasses.dataclass
class RunResult:
    results: list[RequestResult]
    decode_s: float
    """Wall time of the run, compilation excluded."""
    compile_s: float
    steps: int
    """Engine steps (each one target forward for all slots)."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.decode_s, 1e-9)

    @property
    def acceptance_length(self) -> float | None:
        return acceptance_length(sum(r.accepted for r in self.results),
                                 sum(r.steps for r in self.results))


def cache_room(spec: SpecConfig) -> int:
    """Cache slots an engine keeps past its longest sequence: one tree and one pending block.
    Its cache holds max_len plus this, rounded up to a multiple of 64."""
    return spec.nodes + spec.max_depth + 2


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


class Engine:
    """Serves requests on `max_slots` slots of up to `max_len` tokens (prompt + generation)."""

    def __init__(self, target: Target, draft: Draft | None = None, spec: SpecConfig | None = None,
                 *, max_slots: int = 8, max_len: int | None = None,
                 eos_ids: Sequence[int] | None = None,
                 trace_sink: Callable[[object], None] | None = None, seed: int = 0):
        spec = spec or SpecConfig(mode="off" if draft is None else "tree")
        if spec.needs_draft and draft is None:
            raise ConfigError(f"spec mode {spec.mode!r} needs a draft model")
        if draft is not None:
            check_fits(draft.cfg, target.cfg)
        if max_slots < 1:
            raise ConfigError(f"max_slots must be >= 1, got {max_slots}")
        self.target, self.draft, self.spec = target, draft, spec
        self.max_slots = max_slots
        self.max_len = max_len or min(target.cfg.max_position_embeddings, 2048)
        self.cache_size = -(-(self.max_len + cache_room(spec)) // 64) * 64
        eos = target.cfg.eos_token_ids if eos_ids is None else tuple(eos_ids)
        self.eos = jnp.asarray(np.array(list(eos) or [-1], np.int32))
        self.eos_set = frozenset(eos)
        self.eos_ids = tuple(eos)
        # The serving draft and its version, swapped together in one assignment, so a step
        # started on another thread always sees a matching pair.
        self._serving = (None if draft is None else draft.state, 0)
        self.last_step_version = 0
        self.last_step_draft = self._serving  # (state, version) the last step proposed with
        self.compile_s = 0.0
        self.seed = seed
        self._prefills = 0
        self._recent: dict | None = None  # n-gram references kept from the last run
        tracing = trace_sink is not None
        self.traces = TraceEmitter(trace_sink) if trace_sink is not None else None
        self._init = jax.jit(step.init_state, static_argnums=tuple(range(8)))
        self._prefill = jax.jit(functools.partial(step.prefill, trace=tracing))
        self._insert = jax.jit(step.insert, donate_argnums=(1,))
        self._generate = jax.jit(functools.partial(step.generate, spec=spec, trace=tracing),
                                 donate_argnums=(4,))
        self._deactivate = jax.jit(
            lambda state, slot: dataclasses.replace(state, active=state.active.at[slot].set(False)),
            donate_argnums=(0,))
        self._programs: dict[tuple, jax.stages.Compiled] = {}  # (name, shape bucket) -> program

    # ---- JetStream-style API -------------------------------------------------------------

    def init_decode_state(self) -> step.DecodeState:
        cfg = self.target.cfg
        sharding = cache_sharding(self.target.mesh,
                                  KVCache.shape(cfg, self.max_slots, self.cache_size))
        # Built by a jitted function so that its arrays are typed and placed exactly like the
        # states that steps return: the first step then reuses the steady-state program.
        return self._init(cfg, None if self.draft is None else self.draft.cfg, self.spec,
                          self.max_slots, self.cache_size, self.target.dtype, self.seed, sharding)

    def prefill(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> step.Prefix:
        """Prefills a group of prompts (padded to a bucketed batch and length)."""
        b = _bucket(len(prompts), 1)
        t = min(_bucket(max(map(len, prompts)), 16), self.cache_size)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)], lengths[i] = p, len(p)
        key = jax.random.fold_in(jax.random.key(self.seed + 1), self._prefills)
        self._prefills += 1
        return self._call(("prefill", b, t), self._prefill,
                          *self._prefill_args(tokens, lengths, key, sampling))

    def _prefill_args(self, tokens_bxT: np.ndarray, lengths_b: np.ndarray, key,
                      sampling: list[SamplingParams]) -> tuple:
        tgraph, dgraph = self.target.graphdef, self.draft and self.draft.graphdef
        return (tgraph, self.target.state, dgraph, self._serving[0], jnp.asarray(tokens_bxT),
                jnp.asarray(lengths_b), key, SamplingRows.stack(sampling, len(lengths_b)))

    def insert(self, prefix: step.Prefix, state: step.DecodeState, slots: list[int],
               max_new: list[int], sampling: list[SamplingParams]) -> step.DecodeState:
        """Puts prefilled rows into `slots` (the first len(slots) rows of the prefix)."""
        return self._call(("insert", *prefix.tokens.shape), self._insert,
                          *self._insert_args(prefix, state, slots, max_new, sampling))

    def _insert_args(self, prefix, state, slots: list[int], max_new: list[int],
                     sampling: list[SamplingParams]) -> tuple:
        b = prefix.lengths.shape[0]
        pad = b - len(slots)
        slot_arr = np.array(list(slots) + [self.max_slots] * pad, np.int32)  # >= B: dropped
        return (prefix, state, jnp.asarray(slot_arr),
                jnp.asarray(np.array(list(max_new) + [1] * pad, np.int32)),
                SamplingRows.stack(sampling, b), self.eos)

    def prefill_buckets(self, max_prompt_len: int | None = None) -> list[tuple[int, int]]:
        """Every (group, length) shape `prefill` pads prompts of up to `max_prompt_len` tokens
        to (default: the longest prompt the engine takes), for groups of 1 to max_slots."""
        longest = min(max_prompt_len or self.max_len - 1, self.max_len - 1)
        groups = sorted({_bucket(n, 1) for n in range(1, self.max_slots + 1)})
        lengths = sorted({min(_bucket(n, 16), self.cache_size) for n in range(1, longest + 1)})
        return [(b, t) for b in groups for t in lengths]

    def precompile(self, max_prompt_len: int | None = None,
                   on_program: Callable[[], None] | None = None) -> int:
        """Compiles, or loads from the persistent compilation cache, every program that
        traffic of prompts up to `max_prompt_len` tokens can use: prefill and insert for each
        of `prefill_buckets`, the step and the slot release; runs none of them. Afterwards
        `compilations` stays where it is whatever comes. `on_program` is called after each
        (a progress bar). Returns how many programs were new."""
        before = self.compilations
        state = self.init_decode_state()
        key = jax.random.key(self.seed + 1)

        def build(name: tuple, fn, *args) -> jax.stages.Compiled:
            program = self._compile(name, fn, *args)
            if on_program is not None:
                on_program()
            return program

        for b, t in self.prefill_buckets(max_prompt_len):
            prefill = build(("prefill", b, t), self._prefill, *self._prefill_args(
                np.zeros((b, t), np.int32), np.ones((b,), np.int32), key, []))
            prefix = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                prefill.out_info)
            build(("insert", b, t), self._insert,
                  *self._insert_args(prefix, state, [0], [1], []))
        dgraph = self.draft and self.draft.graphdef
        build(("generate",), self._generate, self.target.graphdef, self.target.state, dgraph,
              self._serving[0], state, self.eos)
        build(("deactivate",), self._deactivate, state, jnp.int32(0))
        return self.compilations - before

    def generate(self, state: step.DecodeState) -> tuple[step.DecodeState, step.StepOutput]:
        """One speculative step for every slot; `state` is consumed."""
        dgraph = self.draft and self.draft.graphdef
        self.last_step_draft = self._serving
        draft_state, self.last_step_version = self._serving
        return self._call(("generate",), self._generate, self.target.graphdef,
                          self.target.state, dgraph, draft_state, state, self.eos)

    @property
    def draft_state(self):
        return self._serving[0]

    @property
    def draft_version(self) -> int:
        return self._serving[1]

    def set_draft(self, draft_state, version: int | None = None) -> None:
        """Hot swap: the next step uses `draft_state` (same structure, shapes, dtypes).
        Safe to call from another thread while the engine serves. Everything that swaps drafts
        goes through the draft channel (engine/channel.py), its only caller."""
        if self.draft is None:
            raise ConfigError("this engine was built without a draft; nothing to swap")
        if not same_layout(self.draft_state, draft_state):
            raise ConfigError("new draft params differ in structure, shape or dtype from the "
                              "serving draft; a swap would recompile")
        self._serving = (draft_state, self.draft_version + 1 if version is None else version)

    def deactivate(self, state: step.DecodeState, slot: int) -> step.DecodeState:
        """Marks `slot` idle (a cancelled request): the next step leaves it alone."""
        return self._call(("deactivate",), self._deactivate, state, jnp.int32(slot))

    # ---- host loop -----------------------------------------------------------------------

    def check_request(self, r: Request) -> None:
        if not r.prompt:
            raise PromptError("empty prompt: at least one token is needed")
        if r.max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        if len(r.prompt) + r.max_new_tokens > self.max_len:
            raise PromptError(
                f"prompt of {len(r.prompt)} tokens plus max_new_tokens={r.max_new_tokens} "
                f"exceeds the engine's max_len of {self.max_len} tokens")

    def batcher(self, on_result: Callable[[RequestResult], None] | None = None,
                on_tokens: Callable[[RequestResult], None] | None = None) -> Batcher:
        """A continuous-batching loop over a fresh decode state (engine/batcher.py). The
        n-gram references of the last run carry over into it."""
        state = self.init_decode_state()
        if self._recent is not None:
            # (steps donate them)
            state, self._recent = dataclasses.replace(state, **self._recent), None
        return Batcher(self, state, on_result, on_tokens)

    def keep_recent(self, state: step.DecodeState) -> None:
        """Keeps a finished loop's n-gram references for the next one (as a server would)."""
        if state.recent.shape[0]:
            self._recent = {"recent": state.recent, "recent_len": state.recent_len,
                            "recent_next": state.recent_next}

    def run(self, requests: Sequence[Request],
            on_result: Callable[[RequestResult], None] | None = None,
            before_step: Callable[[], object] | None = None) -> RunResult:
        """Serves every request with continuous batching; results in request order.
        `before_step` runs at every step boundary (the draft channel's `apply`)."""
        for r in requests:
            self.check_request(r)
        compile_before, t0 = self.compile_s, time.perf_counter()
        loop = self.batcher(on_result)
        for r in requests:
            loop.submit(r)
        loop.run_until_idle(before_step)
        wall = time.perf_counter() - t0
        compile_s = self.compile_s - compile_before
        self.keep_recent(loop.state)
        return RunResult(loop.results, wall - compile_s, compile_s, loop.steps)

    def forget_recent(self) -> None:
        """Drops the finished sequences n-gram drafting looks up (kept from run to run, as a
        server keeps them): a benchmark that serves the same prompts again calls this, or the
        second pass would find its own earlier outputs."""
        self._recent = None

    @property
    def compilations(self) -> int:
        """Programs compiled so far (one per step function and shape bucket)."""
        return len(self._programs)

    def program(self, *key) -> jax.stages.Compiled | None:
        """The compiled program for `key` ("generate"; "prefill", b, t; ...), None before its
        first use: for inspecting what a step compiles to (`as_text()`, `cost_analysis()`)."""
        return self._programs.get(key)

    def _call(self, key: tuple, fn, *args):
        """Runs the program compiled for `key`, compiling it first (timed into compile_s).
        Arguments of another shape, dtype or sharding than the program's are an error, never
        a silent recompile."""
        return self._compile(key, fn, *args)(*args)

    def _compile(self, key: tuple, fn, *args) -> jax.stages.Compiled:
        """The program for `key`, compiled from `args` (arrays or shape structs) on first
        use. A program loaded from the persistent compilation cache counts as one too."""
        program = self._programs.get(key)
        if program is None:
            t0 = time.perf_counter()
            with jax.set_mesh(self.target.mesh):  # the kernels shard over it (dispatch.py)
                program = self._programs[key] = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return program

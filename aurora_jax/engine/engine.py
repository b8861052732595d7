"""The serving engine: fixed slots, continuous batching, speculative decoding, hot swap.

The API follows JetStream's Engine (`init_decode_state`, `prefill`, `insert`, `generate`);
each is a jitted pure function from engine/step.py, compiled once per shape. `run` is the
host loop over it: admit queued requests into free slots (prefill a padded group, insert),
step all slots, read each step's results one step late so the device never waits for the
host, and hand a finished slot to the next request. `set_draft` replaces the draft params
between steps (same structure, so nothing recompiles). With `SpecConfig(mode="off")` the same
engine decodes with the target alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.engine import step
from aurora_jax.engine.trace import PrefillTrace, TraceEmitter, VerifyTrace
from aurora_jax.errors import ConfigError, PromptError
from aurora_jax.models.eagle3_io import Draft, check_fits, same_layout
from aurora_jax.models.hf_io import Target
from aurora_jax.models.sharding import cache_sharding
from aurora_jax.sampling import SamplingParams, SamplingRows
from aurora_jax.speculative.config import SpecConfig


@dataclasses.dataclass
class Request:
    prompt: list[int]
    """Prompt token ids."""
    max_new_tokens: int = 64
    """Generation budget, the stop token included."""
    sampling: SamplingParams = SamplingParams()
    """Greedy by default."""
    id: object = None
    """Caller's id (default: the request's index in `run`)."""
    domain: str | None = None
    """Traffic domain tag, carried into traces and results."""


@dataclasses.dataclass
class RequestResult:
    id: object
    domain: str | None
    prompt_tokens: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    """"stop" (a stop token ended it) or "length" (max_new_tokens reached)."""
    steps: int = 0
    """Verification steps (target forwards after the prefill)."""
    accepted: int = 0
    """Draft tokens accepted over all steps."""
    draft_versions: set = dataclasses.field(default_factory=set)

    @property
    def acceptance_length(self) -> float | None:
        """Tokens committed per verification step, bonus included (tau >= 1)."""
        return (self.accepted + self.steps) / self.steps if self.steps else None

    @property
    def target_forwards(self) -> int:
        return self.steps + 1


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
        steps = sum(r.steps for r in self.results)
        return (sum(r.accepted for r in self.results) + steps) / steps if steps else None


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
        # Room past the longest sequence for one tree and one pending block.
        self.cache_size = -(-(self.max_len + spec.nodes + spec.max_depth + 2) // 64) * 64
        eos = target.cfg.eos_token_ids if eos_ids is None else tuple(eos_ids)
        self.eos = jnp.asarray(np.array(list(eos) or [-1], np.int32))
        self._eos_set = set(eos)
        self.eos_ids = tuple(eos)
        # The serving draft and its version, swapped together in one assignment, so a step
        # started on another thread always sees a matching pair.
        self._serving = (None if draft is None else draft.state, 0)
        self.last_step_version = 0
        self.compile_s = 0.0
        self.seed = seed
        self._prefills = 0
        self._recent: dict | None = None  # n-gram references kept from the last run
        tracing = trace_sink is not None
        self.traces = TraceEmitter(trace_sink) if tracing else None
        self._init = jax.jit(step.init_state, static_argnums=tuple(range(8)))
        self._prefill = jax.jit(functools.partial(step.prefill, trace=tracing))
        self._insert = jax.jit(step.insert, donate_argnums=(1,))
        self._generate = jax.jit(functools.partial(step.generate, spec=spec, trace=tracing),
                                 donate_argnums=(4,))

    # ---- JetStream-style API -------------------------------------------------------------

    def init_decode_state(self) -> step.DecodeState:
        cfg = self.target.cfg
        sharding = cache_sharding(self.target.mesh, (self.max_slots, self.cache_size,
                                                     cfg.num_kv_heads, cfg.head_dim))
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
        tgraph, dgraph = self.target.graphdef, self.draft and self.draft.graphdef
        return self._timed(self._prefill, tgraph, self.target.state, dgraph, self._serving[0],
                           jnp.asarray(tokens), jnp.asarray(lengths), key,
                           SamplingRows.stack(sampling, b))

    def insert(self, prefix: step.Prefix, state: step.DecodeState, slots: list[int],
               max_new: list[int], sampling: list[SamplingParams]) -> step.DecodeState:
        """Puts prefilled rows into `slots` (the first len(slots) rows of the prefix)."""
        b = prefix.lengths.shape[0]
        pad = b - len(slots)
        slot_arr = np.array(list(slots) + [self.max_slots] * pad, np.int32)  # >= B: dropped
        return self._timed(self._insert, prefix, state, jnp.asarray(slot_arr),
                           jnp.asarray(np.array(list(max_new) + [1] * pad, np.int32)),
                           SamplingRows.stack(sampling, b), self.eos)

    def generate(self, state: step.DecodeState) -> tuple[step.DecodeState, step.StepOutput]:
        """One speculative step for every slot; `state` is consumed."""
        dgraph = self.draft and self.draft.graphdef
        draft_state, self.last_step_version = self._serving
        return self._timed(self._generate, self.target.graphdef, self.target.state, dgraph,
                           draft_state, state, self.eos)

    @property
    def draft_state(self):
        return self._serving[0]

    @property
    def draft_version(self) -> int:
        return self._serving[1]

    def set_draft(self, draft_state, version: int | None = None) -> None:
        """Hot swap: the next step uses `draft_state` (same structure, shapes, dtypes).
        Safe to call from another thread (a learner's) while the engine serves."""
        if self.draft is None:
            raise ConfigError("this engine was built without a draft; nothing to swap")
        if not same_layout(self.draft_state, draft_state):
            raise ConfigError("new draft params differ in structure, shape or dtype from the "
                              "serving draft; a swap would recompile")
        self._serving = (draft_state, self.draft_version + 1 if version is None else version)

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

    def run(self, requests: Sequence[Request],
            on_result: Callable[[RequestResult], None] | None = None) -> RunResult:
        """Serves every request with continuous batching; results in request order."""
        for r in requests:
            self.check_request(r)
        results = [RequestResult(r.id if r.id is not None else i, r.domain, len(r.prompt))
                   for i, r in enumerate(requests)]
        queue = collections.deque(range(len(requests)))
        slot_req: list[int | None] = [None] * self.max_slots
        compile_before, t0 = self.compile_s, time.perf_counter()
        state = self.init_decode_state()
        if self._recent is not None:  # n-gram references carry over from earlier runs
            state, self._recent = state.replace(**self._recent), None  # (steps donate them)
        steps, prev = 0, None

        def finish(i: int) -> None:
            res = results[i]
            res.finish_reason = ("stop" if res.token_ids and res.token_ids[-1] in self._eos_set
                                 else "length")
            if on_result:
                on_result(res)

        while True:
            free = [s for s, i in enumerate(slot_req) if i is None]
            if free and queue:
                group = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                state = self._admit(state, [requests[i] for i in group], group, free, results,
                                    slot_req, finish)
            out = None
            if any(i is not None for i in slot_req):
                state, out = self.generate(state)
                steps += 1
                snapshot = list(slot_req)
                if self.traces:
                    TraceEmitter.start_copy(out.trace)
            if prev is not None:
                self._absorb(*prev, results, slot_req, finish)
            prev = None if out is None else (out, snapshot, self.last_step_version)
            if out is None and not queue:
                break
        wall = time.perf_counter() - t0
        compile_s = self.compile_s - compile_before
        if state.recent.shape[0]:
            self._recent = {"recent": state.recent, "recent_len": state.recent_len,
                            "recent_next": state.recent_next}
        return RunResult(results, wall - compile_s, compile_s, steps)

    def forget_recent(self) -> None:
        """Drops the finished sequences n-gram drafting looks up (kept from run to run, as a
        server keeps them): a benchmark that serves the same prompts again calls this, or the
        second pass would find its own earlier outputs."""
        self._recent = None

    def _admit(self, state, reqs, ids, free, results, slot_req, finish):
        prefix = self.prefill([r.prompt for r in reqs], [r.sampling for r in reqs])
        slots = free[: len(reqs)]
        state = self.insert(prefix, state, slots, [r.max_new_tokens for r in reqs],
                            [r.sampling for r in reqs])
        first = np.asarray(prefix.first)
        if self.traces:
            aux, hidden = jax.device_get((prefix.aux, prefix.hidden))
        for j, (r, i) in enumerate(zip(reqs, ids, strict=True)):
            results[i].token_ids.append(int(first[j]))
            slot_req[slots[j]] = i
            done = int(first[j]) in self._eos_set or r.max_new_tokens == 1
            if self.traces:
                n = len(r.prompt)
                self.traces.submit(PrefillTrace(results[i].id, r.domain, np.asarray(r.prompt),
                                                int(first[j]), aux[j, :n], hidden[j, :n], done))
            if done:
                slot_req[slots[j]] = None  # the device marked the slot idle at insert
                finish(i)
        return state

    def _absorb(self, out: step.StepOutput, snapshot, version, results, slot_req, finish):
        tokens, emitted, accepted, active, done = jax.device_get(
            (out.tokens, out.emitted, out.accepted, out.active, out.done))
        for s in np.nonzero(active)[0]:
            i = snapshot[s]
            res = results[i]
            res.token_ids.extend(tokens[s, : emitted[s]].tolist())
            res.steps += 1
            res.accepted += int(accepted[s])
            res.draft_versions.add(version)
            if done[s]:
                slot_req[s] = None
                finish(i)
        if self.traces:
            self.traces.submit(VerifyTrace(
                [None if i is None else results[i].id for i in snapshot],
                [None if i is None else results[i].domain for i in snapshot], version,
                out.trace, active, tokens, emitted, accepted, done))

    def _timed(self, fn, *args):
        """Calls a jitted function; a call that compiled adds its time to compile_s."""
        size = fn._cache_size()
        t0 = time.perf_counter()
        out = fn(*args)
        if fn._cache_size() != size:
            jax.block_until_ready(out)
            self.compile_s += time.perf_counter() - t0
        return out

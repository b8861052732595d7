"""Continuous batching on the host: which request each slot serves, and the one-step-late read.

A `Batcher` drives an `Engine` for a stream of requests. Each `step()`:
  1. admits queued requests into free slots (one prefill for the group, then insert);
  2. dispatches one decode step for all slots, if any slot is busy;
  3. reads the *previous* step's output (tokens, acceptance, finished slots), so that the
     device computes step n while the host books step n-1 and never waits for it;
  4. frees the slots whose requests finished and reports them.

Everything here is host-side Python over small numpy arrays; device work is the engine's.
A request's result accumulates in a `RequestResult`; `on_result` is called once per request,
when it finishes, and `on_tokens` each time tokens are added to it (streaming). `cancel`
ends a request early, queued or in a slot: its slot is free for the next admission (the device
marks it idle before the next step). `Engine.run` is a batcher fed every request up front; a
server feeds one as requests arrive.

In a multi-process job (aurora_jax/distributed.py) every process runs this same loop over the
same requests, so every process dispatches the same steps in the same order; outputs are read
with `to_host`, which takes this process's copy of a replicated output (and gathers one split
across processes), so every process books the same results.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from aurora_jax.distributed import to_host
from aurora_jax.engine.step import DecodeState, Prefix, StepOutput
from aurora_jax.engine.trace import EndTrace, PrefillTrace, TraceEmitter, VerifyTrace
from aurora_jax.sampling import SamplingParams


class Stepper(Protocol):
    """What a batcher drives: the compiled programs of one engine (engine/engine.Engine)."""

    max_slots: int
    eos_set: frozenset[int]
    traces: TraceEmitter | None
    last_step_version: int

    def check_request(self, r: Request) -> None: ...

    def prefill(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> Prefix: ...

    def insert(self, prefix: Prefix, state: DecodeState, slots: list[int],
               max_new: list[int], sampling: list[SamplingParams]) -> DecodeState: ...

    def generate(self, state: DecodeState) -> tuple[DecodeState, StepOutput]: ...

    def deactivate(self, state: DecodeState, slot: int) -> DecodeState: ...


def acceptance_length(accepted: int, steps: int) -> float | None:
    """Tokens committed per verification step, bonus included (tau >= 1): (accepted draft
    tokens + one bonus token per step) / steps; None before the first step."""
    return (accepted + steps) / steps if steps else None


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
    """"stop" (a stop token ended it), "length" (max_new_tokens reached) or the reason given
    to `Batcher.cancel` ("abort" by default)."""
    steps: int = 0
    """Verification steps (target forwards after the prefill)."""
    accepted: int = 0
    """Draft tokens accepted over all steps."""
    draft_versions: set = dataclasses.field(default_factory=set)
    index: int = -1
    """Position in its batcher's `results` (what `Batcher.cancel` takes)."""

    @property
    def acceptance_length(self) -> float | None:
        """Tokens committed per verification step, bonus included (tau >= 1)."""
        return acceptance_length(self.accepted, self.steps)

    @property
    def target_forwards(self) -> int:
        return self.steps + 1


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose output the host has not read yet."""

    out: StepOutput
    slot_request: list[int | None]  # [B] request index per slot when the step was dispatched
    draft_version: int


class Batcher:
    """Admission queue, slot table and one-step-late reads for one engine."""

    def __init__(self, engine: Stepper, state: DecodeState,
                 on_result: Callable[[RequestResult], None] | None = None,
                 on_tokens: Callable[[RequestResult], None] | None = None):
        self.engine, self.state, self.on_result = engine, state, on_result
        self.on_tokens = on_tokens
        self.requests: list[Request] = []
        self.results: list[RequestResult] = []
        self.queue: collections.deque[int] = collections.deque()
        self.slot_request: list[int | None] = [None] * engine.max_slots
        self.steps = 0
        self.by_version: dict[int, list[int]] = {}
        """Draft version -> [rows verified, draft tokens accepted] over the steps it served
        (rows: one per busy slot per step; what the collapse guard judges a version by)."""
        self._in_flight: _InFlight | None = None

    # ---- the loop -------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queues a request (checked first); returns its index into `results`."""
        self.engine.check_request(request)
        i = len(self.requests)
        self.requests.append(request)
        self.results.append(RequestResult(request.id if request.id is not None else i,
                                          request.domain, len(request.prompt), index=i))
        self.queue.append(i)
        return i

    def cancel(self, i: int, reason: str = "abort") -> None:
        """Ends request `i` now with `finish_reason=reason` (reported through `on_result`);
        a request that already finished is left alone. Its slot is free at once: the device
        marks it idle before the next step, and tokens the step in flight still makes for
        it are dropped."""
        res = self.results[i]
        if res.finish_reason:
            return
        if i in self.queue:
            self.queue.remove(i)
        elif i in self.slot_request:
            slot = self.slot_request.index(i)
            self.slot_request[slot] = None
            self.state = self.engine.deactivate(self.state, slot)
            if self.engine.traces:  # its trace so far is a whole training sequence
                self.engine.traces.submit(EndTrace(res.id))
        res.finish_reason = reason
        if self.on_result:
            self.on_result(res)

    @property
    def idle(self) -> bool:
        """Nothing queued, no slot busy, no output unread."""
        return not self.queue and not self.busy and self._in_flight is None

    @property
    def busy(self) -> bool:
        return any(i is not None for i in self.slot_request)

    def step(self) -> None:
        """Admit, dispatch one decode step, read the previous one."""
        self.admit()
        dispatched = None
        if self.busy:
            self.state, out = self.engine.generate(self.state)
            self.steps += 1
            if self.engine.traces and out.trace is not None:
                TraceEmitter.start_copy(out.trace)
            dispatched = _InFlight(out, list(self.slot_request), self.engine.last_step_version)
        if self._in_flight is not None:
            self.absorb(self._in_flight)
        self._in_flight = dispatched

    def run_until_idle(self, before_step: Callable[[], object] | None = None) -> None:
        while not self.idle:
            if before_step is not None:
                before_step()
            self.step()

    # ---- the named parts of a step ---------------------------------------------------------

    def free_slots(self) -> list[int]:
        return [s for s, i in enumerate(self.slot_request) if i is None]

    def admit(self) -> None:
        """Prefills as many queued requests as there are free slots and inserts them."""
        free = self.free_slots()
        if not free or not self.queue:
            return
        ids = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        reqs = [self.requests[i] for i in ids]
        slots = free[: len(ids)]
        engine = self.engine
        prefix = engine.prefill([r.prompt for r in reqs], [r.sampling for r in reqs])
        self.state = engine.insert(prefix, self.state, slots, [r.max_new_tokens for r in reqs],
                                   [r.sampling for r in reqs])
        first = to_host(prefix.first)
        if engine.traces:
            aux, hidden = to_host((prefix.aux, prefix.hidden))
        for j, (r, i) in enumerate(zip(reqs, ids, strict=True)):
            token = int(first[j])
            self.results[i].token_ids.append(token)
            # The slot is the request's before anyone hears of its token: `on_tokens` may
            # cancel it (a stop string in the server), and then finds it there to free.
            self.slot_request[slots[j]] = i
            # The device marked the slot idle at insert already when the first token ends it.
            done = token in engine.eos_set or r.max_new_tokens == 1
            if engine.traces:
                n = len(r.prompt)
                engine.traces.submit(PrefillTrace(self.results[i].id, r.domain,
                                                  np.asarray(r.prompt), token, aux[j, :n],
                                                  hidden[j, :n], done))
            if self.on_tokens:
                self.on_tokens(self.results[i])
            if done and self.slot_request[slots[j]] == i:  # (not cancelled by on_tokens)
                self.release(slots[j])

    def absorb(self, step: _InFlight) -> None:
        """Books a finished step: tokens, acceptance and draft version per request; frees
        the slots whose requests ended; hands the step to the trace emitter."""
        tokens, emitted, accepted, active, done = to_host(
            (step.out.tokens, step.out.emitted, step.out.accepted, step.out.active,
             step.out.done))
        counts = self.by_version.setdefault(step.draft_version, [0, 0])
        for s in map(int, np.nonzero(active)[0]):
            i = step.slot_request[s]
            assert i is not None  # an active slot serves a request
            counts[0] += 1
            counts[1] += int(accepted[s])
            res = self.results[i]
            if res.finish_reason:  # cancelled while this step ran: its tokens are dropped
                continue
            res.token_ids.extend(tokens[s, : emitted[s]].tolist())
            res.steps += 1
            res.accepted += int(accepted[s])
            res.draft_versions.add(step.draft_version)
            if self.on_tokens:
                self.on_tokens(res)  # may cancel it: then its slot is free already
            if done[s] and self.slot_request[s] == i:
                self.release(s)
        if self.engine.traces and step.out.trace is not None:
            ids = [None if i is None else self.results[i] for i in step.slot_request]
            self.engine.traces.submit(VerifyTrace(
                [None if r is None else r.id for r in ids],
                [None if r is None else r.domain for r in ids], step.draft_version,
                step.out.trace, active, tokens, emitted, accepted, done))

    def release(self, slot: int) -> None:
        """Frees a slot whose request finished and reports the request."""
        i = self.slot_request[slot]
        assert i is not None, f"slot {slot} is already free"
        self.slot_request[slot] = None
        res = self.results[i]
        ended = res.token_ids and res.token_ids[-1] in self.engine.eos_set
        res.finish_reason = "stop" if ended else "length"
        if self.on_result:
            self.on_result(res)

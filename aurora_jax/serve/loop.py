"""The serving loop: one thread owns the engines and steps them; HTTP handlers only enqueue.

Handlers call `submit` (a bounded admission count: a full server refuses at once, it never
queues without bound) and `cancel` (a client that went away); both only post to an inbox
that the loop drains between steps, so the engines are touched by one thread alone. The
loop keeps the waiting requests itself and hands them, up to `max_slots` running in all, to
the engine of the current adaptive window's mode (serve/policy.py; one engine when there is
no policy), whose `Batcher` admits them into free slots (continuous batching). For every
request that received tokens it posts the new text, cut at stop strings, to that request's
asyncio queue on the server's event loop. A stop string ends the request like a stop token:
the slot is freed before the next step.

Drafts: the learner, the draft watcher and /admin/draft offer new versions to the engines'
draft channel (engine/channel.py); the loop has the channel apply the newest offer at the top
of each iteration, so every draft engine takes it before its next step, and asks it after
every step to judge the version on probation (the collapse guard, engine/guard.py): a
collapsed version is rolled back to the trusted draft, the watcher refuses it from then on and
the learner trains on from the trusted draft.

Stopping (`shutdown`): no new admissions; requests in slots finish (up to a deadline, then
they end with `finish_reason` "abort"), queued ones end with "abort" at once.

Across processes (serve/lockstep.py): every process runs this loop; the primary hands what
it drained from its inbox to the others before applying it, so all take the same steps.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from typing import Any

import jax

from aurora_jax.distributed import all_agree
from aurora_jax.engine.adaptive import AdaptiveConfig
from aurora_jax.engine.batcher import Request, RequestResult
from aurora_jax.engine.channel import DraftChannel
from aurora_jax.engine.engine import Engine
from aurora_jax.engine.guard import GuardConfig, Rollback
from aurora_jax.models.sharding import place_like
from aurora_jax.serve.metrics import ServerMetrics
from aurora_jax.serve.policy import WindowPolicy
from aurora_jax.serve.text import TextStream

log = logging.getLogger(__name__)


class ServerBusy(Exception):
    """The admission queue is full (HTTP 429)."""


class ShuttingDown(Exception):
    """The server stopped admitting (HTTP 503)."""


@dataclasses.dataclass
class Ticket:
    """One request in flight, between its HTTP handler and the loop."""

    request: Request
    text: TextStream
    events: asyncio.Queue  # ("delta", text) ... then ("end", finish_reason, RequestResult)
    loop: asyncio.AbstractEventLoop | None  # None: nobody listens (another process's ticket)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    mode: str | None = None  # the engine serving it, once admitted
    index: int | None = None  # in that engine's batcher
    tokens: int = 0  # tokens received so far
    steps: int = 0  # what the metrics have counted of it
    accepted: int = 0
    ended: bool = False
    seq: int | None = None  # its number across processes (serve/lockstep.py)

    def post(self, *event: Any) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ServingLoop:
    """Owns the engines on its own thread. `engines` maps mode names to engines over one
    target ("spec" first when there is a draft, "off" for target-only); with `adaptive` set
    and more than one engine, windows of `window_steps` steps choose among them. With
    `lockstep`, this is one of several processes serving together (serve/lockstep.py).
    `channel` is the engines' draft channel (default: a new one judging with `guard`)."""

    def __init__(self, engines: dict[str, Engine], metrics: ServerMetrics, *, max_queue: int,
                 adaptive: AdaptiveConfig | None = None, window_steps: int = 32,
                 guard: GuardConfig | None = None, channel: DraftChannel | None = None,
                 online=None, watcher=None, learn_when_idle: bool = False, lockstep=None):
        self.engines, self.metrics, self.max_queue = engines, metrics, max_queue
        self.lockstep = lockstep
        self.engine = next(iter(engines.values()))
        self.max_slots = self.engine.max_slots
        self.policy = WindowPolicy(tuple(engines), adaptive, window_steps)
        # Offers land at this loop's step boundaries (the top of each iteration).
        self.channel = channel or DraftChannel(*engines.values(), guard=guard, immediate=False)
        self.channel.on_swap.append(self._swapped)
        self.channel.on_rollback.append(self._rolled_back)
        self._draft_modes = [m for m, e in engines.items() if e.draft is not None]
        self.online, self.watcher = online, watcher
        self.learn_when_idle = learn_when_idle and online is not None
        self.batchers = self._new_batchers()
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Ticket] = collections.deque()  # not yet in a batcher
        self._tickets: dict[tuple[str, int], Ticket] = {}  # (mode, batcher index) -> ticket
        self._pending = 0  # submitted and not yet ended (admission bound)
        self._lock = threading.Lock()
        self._admitting = True
        self._stop_deadline: float | None = None
        self._step_tokens = 0  # tokens delivered by the step being booked
        self._last_busy: list[str] = []  # the engines the last iteration stepped
        self._learner_read = 0.0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aurora-jax-engine", daemon=True)
        metrics.draft_version.set(self.engine.draft_version)
        self._show_mode()

    def _new_batchers(self) -> dict:
        return {m: e.batcher(on_result=functools.partial(self._finished, m),
                             on_tokens=functools.partial(self._tokens, m))
                for m, e in self.engines.items()}

    # ---- called from HTTP handlers (any thread) ----------------------------------------------

    def start(self, warmup: Request | None = None, *, prompt_tokens: int | None = None,
              on_program=None) -> ServingLoop:
        """Starts the loop thread. With `warmup`, before `ready` is set, each engine compiles
        (or loads from the compilation cache) every program that prompts of up to
        `prompt_tokens` tokens can use (None: up to max_len; 0: none ahead of use;
        Engine.precompile, calling `on_program` after each), then serves `warmup` once."""
        self._warmup, self._prompt_tokens, self._on_program = warmup, prompt_tokens, on_program
        self._thread.start()
        return self

    def programs_to_warm(self, prompt_tokens: int | None = None) -> int:
        """How many programs `start` with a warm-up builds before `ready` (a progress bar's
        total)."""
        if prompt_tokens == 0:
            return 0
        return sum(2 * len(e.prefill_buckets(prompt_tokens)) + 2 for e in self.engines.values())

    def submit(self, ticket: Ticket) -> None:
        """Queues `ticket`; raises PromptError for a request no engine can take, ServerBusy when
        full, ShuttingDown after `shutdown`."""
        self.engine.check_request(ticket.request)  # the engines share max_len
        with self._lock:
            if not self._admitting:
                raise ShuttingDown("the server is shutting down")
            if self._pending >= self.max_queue + self.max_slots:
                raise ServerBusy(f"the server is full ({self._pending} requests in flight); "
                                 "retry later")
            self._pending += 1
        self._inbox.put(("submit", ticket))

    def cancel(self, ticket: Ticket, reason: str = "abort") -> None:
        self._inbox.put(("cancel", ticket, reason))

    def stop_admitting(self, grace_s: float) -> None:
        """Refuses new requests from now on (ShuttingDown); queued ones end "abort" at once
        and those in slots get `grace_s` from now to finish, then end "abort", each with its
        final event. Returns at once; a later call can shorten the grace, never extend it."""
        with self._lock:
            self._admitting = False
        self._inbox.put(("shutdown", grace_s))

    def shutdown(self, grace_s: float = 30.0) -> None:
        """`stop_admitting(grace_s)`, then waits for the loop to end and stops the learner
        and the draft watcher."""
        self.stop_admitting(grace_s)
        self._thread.join()
        if self.online is not None:
            self.online.stop()  # it finishes its step and its last publication
        if self.watcher is not None:
            self.watcher.stop()

    def wait(self) -> None:
        """Returns when the loop has ended (another process's loop: when the primary's has)."""
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        return not self._waiting and all(b.idle for b in self.batchers.values())

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._warmup is not None:
                for engine in self.engines.values():  # every program traffic will use
                    if self._prompt_tokens != 0:
                        engine.precompile(self._prompt_tokens, self._on_program)
                    engine.run([dataclasses.replace(self._warmup, id=f"warmup-{id(engine)}")])
                self.batchers = self._new_batchers()
            self._show_compiles()
            if self.online is not None and not self.learn_when_idle:
                self.online.start()
            self.ready.set()
            while True:
                if self._draft_modes:
                    self.channel.apply()  # the newest offer, before any engine steps
                idle = self.idle
                if idle and self._inbox.empty() and self._learn_one():
                    continue
                for item in self._take_in(block=idle):
                    self._apply(item)
                t0 = time.perf_counter()
                if self._stop_deadline is not None and self.idle:
                    return
                self._admit()
                self._step_all(t0)
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear of it
            log.exception("the serving loop failed")
            self.error = e
            for ticket in [*self._tickets.values(), *self._waiting]:
                ticket.post("error", f"the engine failed: {e}")
            self.ready.set()

    def _step_all(self, t0: float) -> None:
        """Steps every engine with work; an engine that stepped alone is timed for the
        policy from `t0` (this iteration's start)."""
        busy = [m for m, b in self.batchers.items() if not b.idle]
        # Timed only when this engine also stepped alone the iteration before (the step
        # whose output it waited for then ran on an otherwise idle device), and compiled
        # nothing (a new prefill shape's first use is no measure of its speed).
        timed, self._last_busy = busy == self._last_busy and len(busy) == 1, busy
        for mode in busy:
            batcher, engine = self.batchers[mode], self.engines[mode]
            self._step_tokens = 0
            compiled = engine.compilations
            batcher.step()
            self._after_step(engine)
            timed = timed and engine.compilations == compiled
            alone = time.perf_counter() - t0 if timed else None
            closed = self.policy.stepped(mode, self._step_tokens, alone)
            if closed is not None:
                self._window_closed(closed)

    def _admit(self) -> None:
        """Hands waiting requests to the current window's engine, up to max_slots running in
        all (a draining engine's requests count until they end)."""
        if not self._waiting:
            return
        held = sum(len(b.queue) + sum(i is not None for i in b.slot_request)
                   for b in self.batchers.values())
        while self._waiting and held < self.max_slots:
            mode = self.policy.current(min(self.max_slots, held + len(self._waiting)))
            ticket = self._waiting.popleft()
            ticket.mode, ticket.index = mode, self.batchers[mode].submit(ticket.request)
            self._tickets[mode, ticket.index] = ticket
            held += 1
        self._show_mode()
        self._update_gauges()

    def _learn_one(self) -> bool:
        """One learner step while nothing is served (schedule "idle"); False if none ran."""
        online = self.online
        if (not self.learn_when_idle or self._stop_deadline is not None or online is None
                or not online.ready()
                or (online.cfg.max_steps is not None and online.steps >= online.cfg.max_steps)):
            return False
        try:
            online.train_step()
            jax.block_until_ready(online.last_metrics)  # a request waits at most this step
        except Exception:  # noqa: BLE001 - keep serving with the last good draft
            log.exception("online learner failed; serving draft version %d from now on",
                          self.engine.draft_version)
            self.learn_when_idle = False
            return False
        self._read_learner()
        return True

    def _take_in(self, block: bool) -> list[tuple]:
        """This iteration's inbox items (waiting up to 50 ms for the first when `block`), then
        ("expire",) once the shutdown's grace has run out; across processes, the primary's."""
        items: list[tuple] = []
        if self.lockstep is None or self.lockstep.primary:
            while True:
                try:
                    items.append(self._inbox.get(timeout=0.05) if block
                                 else self._inbox.get_nowait())
                except queue.Empty:
                    break
                block = False
            if self._stop_deadline is not None and time.perf_counter() > self._stop_deadline:
                items.append(("expire",))
            staged = self.watcher.take_staged() if self.lockstep and self.watcher else None
            if staged is not None:  # a draft the watcher read: swapped in everywhere at once
                items.append(("draft", *staged))
        if self.lockstep is not None:
            items = self.lockstep.exchange(items)
        return items

    def _apply(self, item: tuple) -> None:
        kind = item[0]
        if kind == "submit":
            ticket = item[1]
            self._waiting.append(ticket)
            self.metrics.prompt_tokens.inc(len(ticket.request.prompt))
        elif kind == "cancel":
            ticket, reason = item[1], item[2]
            if ticket.ended:
                pass
            elif ticket.mode is None:  # still waiting here
                self._waiting.remove(ticket)
                self._end(ticket, RequestResult(ticket.request.id, ticket.request.domain,
                                             len(ticket.request.prompt), finish_reason=reason))
            else:
                self.batchers[ticket.mode].cancel(ticket.index, reason)
        elif kind == "shutdown":  # (the earliest deadline asked for stands)
            deadline = time.perf_counter() + item[1]
            self._stop_deadline = min(self._stop_deadline or deadline, deadline)
            while self._waiting:
                ticket = self._waiting.popleft()
                self._end(ticket, RequestResult(ticket.request.id, ticket.request.domain,
                                             len(ticket.request.prompt), finish_reason="abort"))
            for batcher in self.batchers.values():
                for i in list(batcher.queue):
                    batcher.cancel(i, "abort")
        elif kind == "expire":  # the grace ran out: what is left in slots ends now
            for mode, i in list(self._tickets):
                self.batchers[mode].cancel(i, "abort")
        elif kind == "draft":
            self._swap_together(item[1], item[2])
        self._update_gauges()

    def _swap_together(self, version: int, host) -> None:
        """Swaps draft `version` in, in every process before the same step, or in none: the
        primary has it on the host (`host`), the others read it from the store now."""
        like = self.engine.draft_state
        if host is None and self.lockstep is not None and self.lockstep.read_draft:
            try:
                host = self.lockstep.read_draft(version, like)
            except Exception:  # noqa: BLE001 - then no process swaps it in
                log.exception("cannot read draft version %d", version)
        if not all_agree(host is not None):
            log.warning("draft version %d not swapped in: a process could not read it; "
                        "serving version %d stays", version, self.engine.draft_version)
            return
        self.channel.offer(place_like(host, like), version=version)
        self.channel.apply()
        if self.watcher is not None:
            self.watcher.swapped(version, host)

    def _tokens(self, mode: str, res: RequestResult) -> None:
        ticket = self._tickets.get((mode, res.index))
        if ticket is None:
            return
        now = time.perf_counter()
        new = len(res.token_ids) - ticket.tokens
        self._step_tokens += new
        if ticket.first_token is None:
            ticket.first_token = now
            self.metrics.ttft.observe(now - ticket.submitted)
        elif ticket.last_token is not None:  # a step's tokens arrive together: per token, the
            self.metrics.inter_token.observe((now - ticket.last_token) / max(1, new))  # gap/count
        ticket.last_token, ticket.tokens = now, len(res.token_ids)
        self._count_speculation(ticket, res)
        delta = ticket.text.update(res.token_ids, final=False)
        if delta:
            ticket.post("delta", delta)
        if ticket.text.stopped:  # a stop string: end it like a stop token
            self.batchers[mode].cancel(res.index, "stop")

    def _finished(self, mode: str, res: RequestResult) -> None:
        ticket = self._tickets.pop((mode, res.index), None)
        if ticket is not None:
            self._count_speculation(ticket, res)
            self._end(ticket, res)

    def _end(self, ticket: Ticket, res: RequestResult) -> None:
        ticket.ended = True
        if self.lockstep is not None:
            self.lockstep.ended(ticket)
        with self._lock:
            self._pending -= 1
        delta = ticket.text.update(res.token_ids, final=True)
        if delta:
            ticket.post("delta", delta)
        self.metrics.requests.labels(finished_reason=res.finish_reason).inc()
        self.metrics.generation_tokens.inc(len(res.token_ids))
        self.metrics.e2e.observe(time.perf_counter() - ticket.submitted)
        ticket.post("end", res.finish_reason, res)

    def _count_speculation(self, ticket: Ticket, res: RequestResult) -> None:
        steps, accepted = res.steps - ticket.steps, res.accepted - ticket.accepted
        ticket.steps, ticket.accepted = res.steps, res.accepted
        spec = self.engines[ticket.mode].spec  # type: ignore[index]
        if steps <= 0 or spec.mode == "off":
            return
        m = self.metrics
        m.drafts.inc(steps)
        m.draft_tokens.inc(steps * spec.depth)
        m.accepted_tokens.inc(accepted)
        if steps == 1:  # one step: its accepted tokens sit at positions 0 .. accepted-1
            for pos in range(accepted):
                m.accepted_per_pos.labels(position=str(pos)).inc()

    @property
    def swaps(self) -> int:
        """Drafts swapped in while serving."""
        return self.channel.swaps

    @property
    def rollbacks(self) -> int:
        return self.channel.rollbacks

    @property
    def guard(self):
        return self.channel.guard

    def _swapped(self, version: int, latency_s: float) -> None:
        """The channel swapped `version` in at this step boundary, `latency_s` after it was
        offered."""
        self.metrics.swaps.inc()
        self.metrics.swap_latency.observe(latency_s)
        self.metrics.draft_version.set(version)

    def _rolled_back(self, rollback: Rollback) -> None:
        self.metrics.rollbacks.inc()
        self.metrics.draft_version.set(rollback.version)

    def _after_step(self, engine: Engine) -> None:
        if engine.draft is not None:
            self.channel.judge({m: self.batchers[m] for m in self._draft_modes}, engine)
        self._update_gauges()
        self._show_compiles()
        self._read_learner()

    def _read_learner(self) -> None:
        now = time.perf_counter()
        if self.online is not None:
            self.metrics.learner_steps.set(self.online.steps)
        if self.online is not None and now - self._learner_read > 1.0:
            self._learner_read = now  # the loss is a device value: read it now and then
            m = self.online.last_metrics
            if m:
                loss, tau = jax.device_get((m["loss"], m["sim_acceptance_length"]))
                self.metrics.learner_loss.set(float(loss))
                self.metrics.learner_sim_acceptance.set(float(tau))

    def _window_closed(self, window) -> None:
        m = self.metrics
        m.adaptive_windows.labels(mode=window.mode).inc()
        for mode, rate in self.policy.rates(window.load).items():
            if rate is not None:
                m.adaptive_rate.labels(mode=mode).set(rate)
        log.debug("window %d served %s at load %d: %d tokens in %.3f s over %d timed steps",
                  window.index, window.mode, window.load, window.tokens, window.seconds,
                  window.timed)

    def _show_mode(self) -> None:
        for mode, engine in self.engines.items():
            self.metrics.spec_mode.labels(mode=mode, setting=engine.spec.label).set(
                float(mode == self.policy.last_mode))

    def _show_compiles(self) -> None:
        for mode, engine in self.engines.items():
            self.metrics.compiled_programs.labels(mode=mode).set(engine.compilations)
            self.metrics.compile_seconds.labels(mode=mode).set(engine.compile_s)

    def _update_gauges(self) -> None:
        bs = self.batchers.values()
        self.metrics.waiting.set(len(self._waiting) + sum(len(b.queue) for b in bs))
        self.metrics.running.set(sum(i is not None for b in bs for i in b.slot_request))

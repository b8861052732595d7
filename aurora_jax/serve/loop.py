"""The serving loop: one thread owns the engine and steps it; HTTP handlers only enqueue.

Handlers call `submit` (a bounded admission count: a full server refuses at once, it never
queues without bound) and `cancel` (a client that went away); both only post to an inbox
that the loop drains between steps, so the engine is touched by one thread alone. Each step
the loop admits new requests into free slots (`Batcher`, continuous batching), and for every
request that received tokens it posts the new text, cut at stop strings, to that request's
asyncio queue on the server's event loop. A stop string ends the request like a stop token:
the slot is freed before the next step.

Stopping (`shutdown`): no new admissions; requests in slots finish (up to a deadline, then
they end with `finish_reason` "abort"), queued ones end with "abort" at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

import jax

from aurora_jax.engine.batcher import Request, RequestResult
from aurora_jax.engine.engine import Engine
from aurora_jax.serve.metrics import ServerMetrics
from aurora_jax.serve.text import TextStream

log = logging.getLogger(__name__)


class ServerBusy(Exception):
    """The admission queue is full (HTTP 429)."""


class ShuttingDown(Exception):
    """The server stopped admitting (HTTP 503)."""


@dataclasses.dataclass
class Job:
    """One request in flight, between its HTTP handler and the loop."""

    request: Request
    text: TextStream
    events: asyncio.Queue  # ("delta", text) ... then ("end", finish_reason, RequestResult)
    loop: asyncio.AbstractEventLoop
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    index: int | None = None  # the batcher's
    tokens: int = 0  # tokens received so far
    steps: int = 0  # what the metrics have counted of it
    accepted: int = 0
    ended: bool = False

    def post(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ServingLoop:
    """Owns the engine on its own thread."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_queue: int,
                 online=None, watcher=None, learn_when_idle: bool = False):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.online, self.watcher = online, watcher
        self.learn_when_idle = learn_when_idle and online is not None
        self.batcher = engine.batcher(on_result=self._finished, on_tokens=self._tokens)
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}  # batcher index -> job
        self._pending = 0  # submitted and not yet ended (admission bound)
        self._lock = threading.Lock()
        self._admitting = True
        self._stop_deadline: float | None = None
        self._version = engine.draft_version
        self.swaps = 0  # drafts swapped in while serving
        self._learner_read = 0.0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aurora-jax-engine", daemon=True)
        metrics.draft_version.set(self._version)
        metrics.spec_mode.labels(mode=engine.spec.mode).set(1)

    # ---- called from HTTP handlers (any thread) ----------------------------------------------

    def start(self, warmup: Request | None = None) -> ServingLoop:
        self._warmup = warmup
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self._admitting:
                raise ShuttingDown("the server is shutting down")
            if self._pending >= self.max_queue + self.engine.max_slots:
                raise ServerBusy(f"the server is full ({self._pending} requests in flight); "
                                 "retry later")
            self._pending += 1
        self._inbox.put(("submit", job))

    def cancel(self, job: Job, reason: str = "abort") -> None:
        self._inbox.put(("cancel", job, reason))

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stops admitting; in-flight requests get `grace_s` to finish, then end "abort"."""
        with self._lock:
            self._admitting = False
        self._inbox.put(("shutdown", grace_s))
        self._thread.join()
        if self.online is not None:
            self.online.stop()  # it finishes its step and its last publication
        if self.watcher is not None:
            self.watcher.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._warmup is not None:
                self.engine.run([self._warmup])  # compiles the steady-state step
                self.batcher = self.engine.batcher(on_result=self._finished,
                                                   on_tokens=self._tokens)
            if self.online is not None and not self.learn_when_idle:
                self.online.start()
            self.ready.set()
            while True:
                idle = self.batcher.idle
                if idle and self._inbox.empty() and self._learn_one():
                    continue
                self._drain(block=idle)
                if self._stop_deadline is not None:
                    if self.batcher.idle:
                        return
                    if time.perf_counter() > self._stop_deadline:
                        for i in list(self._jobs):
                            self.batcher.cancel(i, "abort")
                if not self.batcher.idle:
                    self.batcher.step()
                    self._after_step()
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear of it
            log.exception("the serving loop failed")
            self.error = e
            for job in list(self._jobs.values()):
                job.post("error", f"the engine failed: {e}")
            self.ready.set()

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
        self._after_step()
        return True

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = item[0]
            if kind == "submit":
                job = item[1]
                job.index = self.batcher.submit(job.request)
                self._jobs[job.index] = job
                self.metrics.prompt_tokens.inc(len(job.request.prompt))
            elif kind == "cancel":
                job, reason = item[1], item[2]
                if job.index is not None and not job.ended:
                    self.batcher.cancel(job.index, reason)
            elif kind == "shutdown":
                self._stop_deadline = time.perf_counter() + item[1]
                for i in list(self.batcher.queue):
                    self.batcher.cancel(i, "abort")
            self._update_gauges()

    def _tokens(self, res: RequestResult) -> None:
        job = self._jobs.get(res.index)
        if job is None:
            return
        now = time.perf_counter()
        if job.first_token is None:
            job.first_token = now
            self.metrics.ttft.observe(now - job.submitted)
        elif job.last_token is not None:  # a step's tokens arrive together: per token, the
            new = max(1, len(res.token_ids) - job.tokens)  # step's time over their count
            self.metrics.inter_token.observe((now - job.last_token) / new)
        job.last_token, job.tokens = now, len(res.token_ids)
        self._count_speculation(job, res)
        delta = job.text.update(res.token_ids, final=False)
        if delta:
            job.post("delta", delta)
        if job.text.stopped:  # a stop string: end it like a stop token
            self.batcher.cancel(job.index, "stop")  # type: ignore[arg-type]

    def _finished(self, res: RequestResult) -> None:
        job = self._jobs.pop(res.index, None)
        if job is None:
            return
        job.ended = True
        with self._lock:
            self._pending -= 1
        self._count_speculation(job, res)
        delta = job.text.update(res.token_ids, final=True)
        if delta:
            job.post("delta", delta)
        self.metrics.requests.labels(finished_reason=res.finish_reason).inc()
        self.metrics.generation_tokens.inc(len(res.token_ids))
        self.metrics.e2e.observe(time.perf_counter() - job.submitted)
        job.post("end", res.finish_reason, res)

    def _count_speculation(self, job: Job, res: RequestResult) -> None:
        steps, accepted = res.steps - job.steps, res.accepted - job.accepted
        job.steps, job.accepted = res.steps, res.accepted
        if steps <= 0 or self.engine.spec.mode == "off":
            return
        m = self.metrics
        m.drafts.inc(steps)
        m.draft_tokens.inc(steps * self.engine.spec.depth)
        m.accepted_tokens.inc(accepted)
        if steps == 1:  # one step: its accepted tokens sit at positions 0 .. accepted-1
            for pos in range(accepted):
                m.accepted_per_pos.labels(position=str(pos)).inc()

    def _after_step(self) -> None:
        version = self.engine.last_step_version
        if version != self._version:
            latency = (time.perf_counter() - self.engine.swapped_at
                       if self.engine.swapped_at is not None else 0.0)
            self._version = version
            self.swaps += 1
            self.metrics.swaps.inc()
            self.metrics.swap_latency.observe(latency)
            self.metrics.draft_version.set(version)
            log.info("hot swap: serving draft version %d, %.1f ms after its publication",
                     version, latency * 1e3)
        self._update_gauges()
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

    def _update_gauges(self) -> None:
        b = self.batcher
        self.metrics.waiting.set(len(b.queue))
        self.metrics.running.set(sum(i is not None for i in b.slot_request))

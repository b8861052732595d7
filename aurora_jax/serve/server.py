"""`aurora-jax serve`: the target and draft, the engine with its learning, the serving loop and
the HTTP app, assembled from a `ServeConfig` and run under uvicorn.

Learning while serving (`learner.mode`): "thread" trains an online learner in this process on
the engine's traces and publishes into the engine (a hot swap between two steps); "workdir"
writes traces to a directory for an `aurora-jax learn --workdir` process and swaps in the
drafts it publishes there. SIGTERM or Ctrl-C: uvicorn stops accepting connections and gives
open ones `grace_s` to finish; then the loop ends what is left with "abort", the learner
finishes its step, and the process exits 0 (SIGTERM) or 130 (Ctrl-C, interrupt.py).

Across processes (a multi-process job, aurora_jax/distributed.py): the target spans every
process's devices; the primary serves HTTP, the others run the same serving loop without it
(`follow`) and stop when the primary stops (serve/lockstep.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from aurora_jax.distributed import is_multiprocess, is_primary
from aurora_jax.engine.batcher import Request
from aurora_jax.errors import ConfigError
from aurora_jax.learn.online import OnlineLearner
from aurora_jax.models.eagle3_io import load_draft
from aurora_jax.serve.config import ServeConfig
from aurora_jax.serve.lockstep import Lockstep
from aurora_jax.serve.loop import ServingLoop
from aurora_jax.serve.metrics import ServerMetrics
from aurora_jax.stack import build_stack, workdir_paths
from aurora_jax.store.draft_store import restore_draft

log = logging.getLogger(__name__)


class Server:
    """Everything `aurora-jax serve` runs, built and warm; `app` is the ASGI app."""

    def __init__(self, cfg: ServeConfig, target_dir: str | Path, *, warm: bool = True,
                 progress: bool = False):
        self.cfg = cfg
        self.model_name = cfg.model_name or _model_name(Path(target_dir))
        self.started = int(time.time())
        learning = cfg.learner
        mode = learning.mode
        if mode == "workdir" and not is_primary():
            # Another process of a multi-process server: the same steps, traces included
            # (the primary writes them), drafts swapped in when the primary's loop says.
            mode = "off"
        self.stack = build_stack(
            cfg, target_dir, max_slots=cfg.max_slots, max_len=cfg.max_len, learning=mode,
            workdir=learning.workdir, alternatives=cfg.window_steps is not None,
            guard=cfg.guard, stage=is_multiprocess(),
            trace_sink=_discard if mode != learning.mode else None)
        assert self.stack.tokenizer is not None  # (build_stack loads it, or says why not)
        self.tokenizer = self.stack.tokenizer
        self.target, self.draft = self.stack.target, self.stack.draft
        self.engines, self.engine = self.stack.engines, self.stack.engine
        self.online: OnlineLearner | None = self.stack.online
        self.metrics = ServerMetrics(max(e.spec.max_depth for e in self.engines.values()))
        self.lockstep = None
        if is_multiprocess():
            read = None
            if learning.mode == "workdir":
                drafts = workdir_paths(learning.workdir or "")[1]
                read = functools.partial(_read_host_draft, drafts)
            self.lockstep = Lockstep(self.tokenizer.decode, read_draft=read)
        self.loop = ServingLoop(self.engines, self.metrics, max_queue=cfg.max_queue,
                                adaptive=cfg.adaptive if cfg.window_steps else None,
                                window_steps=cfg.window_steps or 1,
                                channel=self.stack.channel, online=self.online,
                                watcher=self.stack.watcher,
                                learn_when_idle=learning.schedule == "idle",
                                lockstep=self.lockstep)
        warmup = Request(self.tokenizer.encode("Hello") or [0], 4) if warm else None
        self.loop.start(warmup, prompt_tokens=cfg.warmup_prompt_tokens,
                        on_program=self._progress(warm and progress))
        from aurora_jax.serve.app import create_app

        self.app = create_app(self)

    def _progress(self, show: bool):
        """A progress bar's update for the programs warm-up builds (None: no bar); the bar
        closes itself at its total."""
        total = self.loop.programs_to_warm(self.cfg.warmup_prompt_tokens)
        if not show or not total:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc="serve: compiling", unit="program", file=sys.stderr)

        def update() -> None:
            bar.update()
            if bar.n >= bar.total:
                bar.close()

        return update

    def draft_status(self) -> dict:
        e = self.engine
        return {"draft": self.cfg.draft, "serving_version": e.draft_version,
                "spec": dataclasses.asdict(e.spec), "learning": self.cfg.learner.mode,
                "learner_steps": self.online.steps if self.online else None,
                "drafts_published": self.online.published if self.online else None,
                "hot_swaps": self.loop.swaps, "rollbacks": self.loop.rollbacks,
                "judged_versions": {str(v): why for v, why in self.loop.guard.judged.items()},
                "engines": {m: x.spec.label for m, x in self.engines.items()},
                "adaptive": self.loop.policy.status()}

    def load_draft(self, path: str) -> int:
        """Swaps in the EAGLE-3 draft at `path` (same layout as the serving one)."""
        if self.draft is None:
            raise ConfigError("this server serves without a draft")
        if self.lockstep is not None:
            raise ConfigError("a server across processes takes drafts only from its learner "
                              "process's workdir: a swap must land at the same step in every "
                              "process, which /admin/draft cannot arrange")
        new = load_draft(path, target=self.target.cfg, dtype=self.target.dtype,
                         mesh=self.target.mesh)
        return self.stack.channel.offer(new.state)

    def close(self, grace_s: float = 5.0) -> None:
        """Stops in order: the serving loop (requests get `grace_s`), the learner and the
        draft watcher, each engine's trace thread once its last trace reached the learner or
        the store, then the store's last shard. A trace thread left running would crash the
        process's exit (engine/trace.py)."""
        self.loop.shutdown(grace_s)
        self.stack.close()


@contextlib.contextmanager
def serving_in_thread(server: Server) -> Iterator[str]:
    """Serves `server.app` on a free 127.0.0.1 port from a background thread (tests,
    benchmarks, notebooks); yields the base URL, then stops uvicorn and closes the server."""
    import threading

    if not server.loop.ready.wait(600) or server.loop.error is not None:
        raise RuntimeError(f"the server did not start: {server.loop.error}")
    http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0,
                                         log_level="warning", lifespan="off"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        while not http.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before it started serving")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"
    finally:
        http.should_exit = True
        thread.join(30)
        server.close()


def _discard(trace) -> None:
    """The trace sink of a process that serves beside the primary (which keeps them)."""


def _read_host_draft(drafts: str, version: int, like):
    return restore_draft(drafts, version, like, place=False)[0]


def _model_name(target_dir: Path) -> str:
    """The target's folder name (the built-in ones live in <name>/hf, or are a .gguf file)."""
    if target_dir.suffix.lower() == ".gguf":
        return target_dir.stem
    return target_dir.parent.name if target_dir.name == "hf" else target_dir.name


def serve(cfg: ServeConfig, target_dir: str | Path, grace_s: float = 30.0) -> None:
    """Builds the server, prints where it listens, and serves until SIGTERM (then returns,
    saying what it kept) or Ctrl-C (then raises `Interrupted` with it, for the CLI's exit
    130); either way after the graceful stop."""
    import signal
    import threading

    from aurora_jax.interrupt import Interrupted

    print(f"serve: loading {target_dir} and compiling ...", file=sys.stderr, flush=True)
    server = Server(cfg, target_dir, progress=is_primary())
    server.loop.ready.wait()
    if server.loop.error is not None:
        raise server.loop.error
    # uvicorn's own grace is longer than the loop's: requests still in slots when the loop's
    # runs out end "abort" and their streams get that final chunk before connections close.
    config = uvicorn.Config(server.app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=math.ceil(grace_s) + _HTTP_GRACE_EXTRA_S,
                            lifespan="off")
    http = _Http(config, server.loop.stop_admitting, grace_s)

    def announce():
        while not http.started:
            time.sleep(0.05)
        port = http.servers[0].sockets[0].getsockname()[1] if http.servers else cfg.port
        print(f"serving {server.model_name!r} on http://{cfg.host}:{port}/v1 "
              f"(OpenAI-compatible; /metrics, /health)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGTERM and SIGINT while it serves (a graceful shutdown; a second Ctrl-C
    # cuts the grace short), then raises the signal again for the handler that was there
    # before: for SIGTERM this one, so that serve() returns; for SIGINT the CLI's
    # (interrupt.py), which raises `Interrupted` out of http.run().
    signal.signal(signal.SIGTERM, lambda signum, _frame: None)
    interrupted = False
    try:
        http.run()
    except Interrupted:
        interrupted = True
    finally:  # the loop ends what is left with "abort", the learner finishes its step
        server.close(grace_s=min(grace_s, 5.0))
    if interrupted:
        raise Interrupted(_kept(server))
    print(f"serve: stopped; {_kept(server)}", file=sys.stderr, flush=True)


_HTTP_GRACE_EXTRA_S = 5
"""Seconds uvicorn waits for connections past the serving loop's grace."""


class _Http(uvicorn.Server):
    """uvicorn, which on SIGTERM or Ctrl-C also starts the serving loop's grace at once (not
    after uvicorn's own wait for connections): new requests are refused, queued ones end
    "abort", and each in-flight one gets the grace, then ends "abort" with its final chunk.
    A second signal ends what is left at once."""

    def __init__(self, config: uvicorn.Config, stop_admitting, grace_s: float):
        super().__init__(config)
        self._stop_admitting, self._grace_s = stop_admitting, grace_s

    def handle_exit(self, sig, frame) -> None:
        self._stop_admitting(0.0 if self.should_exit else self._grace_s)
        super().handle_exit(sig, frame)


def follow(cfg: ServeConfig, target_dir: str | Path) -> None:
    """Serves as one of the other processes of a multi-process job: the same engines and
    serving loop as the primary, no HTTP; returns when the primary's loop has stopped. A
    SIGTERM here is ignored: the job stops when the primary does (a process that left early
    would leave the others waiting in a collective)."""
    import signal

    server = Server(cfg, target_dir)
    signal.signal(signal.SIGTERM, lambda signum, _frame: log.warning(
        "SIGTERM ignored: this process stops when process 0 stops serving"))
    server.loop.wait()
    server.close()  # (its loop has ended: this stops the threads beside it)
    if server.loop.error is not None:
        raise server.loop.error
    import jax

    print(f"serve: process {jax.process_index()} stopped with process 0, after "
          f"{sum(b.steps for b in server.loop.batchers.values())} steps; serving draft "
          f"version {server.engine.draft_version}", file=sys.stderr, flush=True)


def _kept(server: Server) -> str:
    """What a stopped server leaves, in one clause."""
    answered = sum(s.value for m in server.metrics.requests.collect() for s in m.samples
                   if s.name.endswith("_total"))
    learning = server.cfg.learner
    if learning.mode == "workdir":
        traces, drafts = workdir_paths(learning.workdir or "")
        kept = f"kept its traces in {traces} (the learner's drafts are in {drafts})"
    elif learning.mode == "thread":
        kept = "nothing written (the draft it learned lived in memory only)"
    else:
        kept = "nothing written"
    return f"answered {int(answered)} requests; {kept}"

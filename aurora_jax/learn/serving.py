"""An engine and whatever keeps its draft learning while it serves, with one lifecycle.

Three ways to serve a stream of requests (what `aurora-jax generate --prompts` offers):
- static: the engine alone, its draft fixed;
- online: an in-process `OnlineLearner` over the engine's traces (learn/online.py), stepped
  either between requests (`learn_per_request` steps after each finished one: on a shared CPU
  a background thread barely gets to run) or as a background thread, on the target's devices
  or on a `learner_mesh` of its own (learn/placement.split_meshes);
- workdir: traces written to a shared workdir (a directory or a kvstore URL) and drafts
  restored from it (learn/remote.py), for an `aurora-jax learn --workdir` process.
`LearningEngine.run` starts what needs starting and stops, flushes and joins it afterwards,
also when serving fails, so a launcher script needs none of this bookkeeping; `close()` (or
leaving a `with` block) ends the rest, in order: the draft watcher, the trace thread after
the last trace, the trace store's last shard. A process that exits with the trace thread
still converting a step's device arrays crashes in JAX's teardown (engine/trace.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jax.sharding import Mesh

from aurora_jax.engine.engine import Engine, Request, RequestResult, RunResult
from aurora_jax.errors import ConfigError
from aurora_jax.learn.kvstore import Location
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.online import OnlineConfig, online_engine
from aurora_jax.learn.remote import shared_engine


class LearningEngine:
    """An `Engine` with its draft's learning (none, in process, or through a workdir)."""

    def __init__(self, target, draft, spec, *, online: OnlineConfig | None = None,
                 workdir: Location | None = None, learn_per_request: int = 0,
                 learner_mesh: Mesh | None = None, **engine_kwargs):
        if online is not None and workdir is not None:
            raise ConfigError("learn in this process (online) or in another (workdir), not both")
        if learner_mesh is not None and online is None:
            raise ConfigError("learner_mesh places the in-process (online) learner; there is none")
        if learn_per_request < 0:
            raise ConfigError(f"learn_per_request must be >= 0, got {learn_per_request}")
        self.online = self.store = self.watcher = None
        self.learn_per_request = learn_per_request
        if online is not None:
            learner = Learner(draft, target, mesh=learner_mesh)
            self.engine, self.online = online_engine(target, draft, spec, learner, online,
                                                     **engine_kwargs)
        elif workdir is not None:
            self.engine, self.store, self.watcher = shared_engine(target, draft, spec, workdir,
                                                                  **engine_kwargs)
        else:
            self.engine = Engine(target, draft if spec.needs_draft else None, spec,
                                 **engine_kwargs)

    def run(self, requests: Sequence[Request],
            on_result: Callable[[RequestResult], None] | None = None) -> RunResult:
        """Serves the requests while the draft learns; everything started here is stopped
        (and traces flushed) before it returns or raises."""
        online, callback = self.online, on_result
        if online is not None and self.learn_per_request > 0:
            def callback(res: RequestResult) -> None:  # interleaved: learn between requests
                if on_result is not None:
                    on_result(res)
                online.train_steps(self.learn_per_request)
        elif online is not None:
            online.start()  # a background thread
        try:
            return self.engine.run(requests, on_result=callback)
        finally:
            if self.engine.traces:  # the last step's trace is submitted after its results
                self.engine.traces.flush()
            if online is not None:
                online.stop()
            if self.watcher is not None and self.store is not None:
                self.watcher.stop()
                self.store.flush()

    def close(self) -> None:
        """Stops the draft watcher, ends the trace thread once every trace reached the learner
        or the store, and writes the store's last shard. Serving again afterwards is an
        error; calling it again does nothing."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.engine.traces:
            self.engine.traces.close()
        if self.store is not None:
            self.store.flush()

    def __enter__(self) -> LearningEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """What the learning did, in a few words."""
        if self.online is not None:
            return (f"learner steps {self.online.steps}, drafts published "
                    f"{self.online.published}")
        if self.store is not None:
            return (f"traces in {self.store.location}, serving draft version "
                    f"{self.engine.draft_version}")
        return "static draft" if self.engine.draft is not None else "no draft"

"""One serving stack, assembled in one place: the target and its draft, one engine per
speculation setting, where their traces go, the learner that trains on them and the draft
channel through which every new draft reaches the engines.

`serve`, `run`, `generate` and the objectives experiment build their stacks here
(`build_stack`); a learner process (`learn`, aurora_jax/learn_job.py) loads its models here
(`load_models`). Their configs embed
`StackConfig`, so the shared settings have the same key names everywhere:

    target, draft, draft_vocab_size, dtype, tp, seed   what is loaded, and how
    spec, adaptive                                      speculation, and its alternatives
    learner                                             online learning (LearnerConfig)

Where the traces go (`learning`): "off", nowhere; "thread", a TraceBuffer that an in-process
`OnlineLearner` trains on, publishing into the channel; "workdir", a trace store in a workdir
(a directory or a kvstore URL) that an `aurora-jax learn --workdir` process follows, whose
drafts a `DraftWatcher` offers to the channel. All engines of a stack share the target, the
draft and the sink, so target-only and n-gram windows feed the learner too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from jax.sharding import Mesh

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.data.vocab import scratch_draft_vocab
from aurora_jax.engine.adaptive import AdaptiveConfig, spec_modes
from aurora_jax.engine.channel import DraftChannel
from aurora_jax.engine.engine import Engine, Request, RequestResult, RunResult
from aurora_jax.engine.guard import GuardConfig
from aurora_jax.errors import CheckpointError, ConfigError
from aurora_jax.learn import placement
from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer
from aurora_jax.learn.learner import Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig, OnlineLearner
from aurora_jax.learn.optimizer import OptimizerSettings
from aurora_jax.models.config import DtypeName
from aurora_jax.models.eagle3 import Draft
from aurora_jax.models.loading import load_pair
from aurora_jax.models.sharding import serving_mesh
from aurora_jax.models.transformer import Target
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.store import kvstore
from aurora_jax.store.draft_store import DraftWatcher
from aurora_jax.store.trace_store import TraceStore
from aurora_jax.store.workdir import ENGINE_KEY, workdir_paths

log = logging.getLogger(__name__)

Learning = Literal["off", "thread", "workdir"]


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The online learner: what it trains on, how, and where."""

    online: OnlineConfig = OnlineConfig(seq_len=96, every_steps=10, min_sequences=3)
    """Batches and publications (learn/online.py): batch_size, seq_len, trees_per_seq,
    every_steps, policy, holdout, vocab (re-choosing the draft vocabulary)."""
    optimizer: OptimizerSettings = OptimizerSettings(learning_rate=3e-3)
    """AdamW and its schedule (learn/optimizer.py)."""
    loss: LossConfig = LossConfig(ttt_steps=3)
    """The draft objective: the TTT unroll and the rejected-node term (learn/losses.py,
    learn/discard.py); its tree_depth follows spec.depth where the learner runs beside the
    engine."""
    devices: tuple[int, ...] | None = None
    """Local devices for the learner alone, by index ([-1]: the last one); the target serves
    on the first `tp` of the others (learn/placement.py), so a learner step never stalls a
    serving step. null: the learner shares the serving devices."""

    def __post_init__(self):
        placement.check_spec(self.devices, "learner.devices")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """What every serving command loads and how it speculates (the keys `serve`, `run` and
    `learn` share)."""

    target: str = "builtin"
    """"builtin" (SmolLM2-135M-Instruct, prepared on first use), "builtin-tiny" (a small
    model trained here), a Hugging Face checkpoint directory or a .gguf file."""
    draft: str = "warm"
    """"warm" (day 0, warm-started from the target's head and top layer), "scratch" (random,
    day 0), an EAGLE-3 directory, or "none" (target only)."""
    draft_vocab_size: int | None = 8192
    """A scratch or warm draft's head rows: the most frequent built-in corpus tokens under the
    target's tokenizer, stop tokens included (null: the whole target vocabulary). An engine
    and a learner process must agree."""
    dtype: DtypeName = "auto"
    """Parameter dtype; auto: float32 on CPU, bfloat16 on GPU/TPU (models/config.device_dtype)."""
    tp: int = 1
    """Tensor-parallel degree: the target is split over this many local devices."""
    seed: int = 0
    """Seeds a scratch draft (an engine's and its learner process's must match) and sampling."""
    spec: SpecConfig = SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12)
    """Speculation: ngram, chain or tree (off: target only)."""
    adaptive: AdaptiveConfig = AdaptiveConfig(alternatives=(SpecConfig(mode="ngram", depth=3),))
    """When to speculate, from measured tokens/s (engine/adaptive.py): the target alone,
    `spec` or one of `adaptive.alternatives`; one engine per setting."""
    learner: LearnerConfig = LearnerConfig()
    """Online learning."""

    def __post_init__(self):
        if self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ConfigError(f"draft_vocab_size must be >= 1 or null, got "
                              f"{self.draft_vocab_size}")


def load_models(cfg: StackConfig, target_dir: str | Path, mesh: Mesh | None = None, *,
                text: bool = True) -> tuple[Target, Draft | None, Tokenizer | None]:
    """(target, draft, tokenizer) as `cfg` names them, on `mesh` (default: `cfg.tp` devices;
    models/sharding.serving_mesh). The draft is None for "none". `text` False: the tokenizer
    is optional, None where the checkpoint has none (a learner process reads no text)."""
    if not Path(target_dir).exists():  # (before the tokenizer says it lacks a file)
        raise CheckpointError(f"checkpoint path does not exist: {target_dir}")
    tokenizer = (Tokenizer.load(target_dir) if text or Tokenizer.present(target_dir)
                 else None)
    vocab = scratch_draft_vocab(cfg.draft_vocab_size, tokenizer) if tokenizer else None
    target, draft = load_pair(target_dir, None if cfg.draft == "none" else cfg.draft,
                              dtype=cfg.dtype, seed=cfg.seed,
                              mesh=mesh if mesh is not None else serving_mesh(cfg.tp),
                              draft_vocab=vocab)
    return target, draft, tokenizer


@dataclasses.dataclass
class Stack:
    """A built serving stack. `engines` maps mode names to engines over one target: "spec"
    (or "off" when the primary setting does not speculate) first, then the alternatives
    ("alt1", ...) and "off" (target-only) when built with them."""

    target: Target
    draft: Draft | None
    tokenizer: Tokenizer | None
    engines: dict[str, Engine]
    channel: DraftChannel
    online: OnlineLearner | None = None
    """The in-process learner (learning "thread"), not started; it trains on `online.buffer`."""
    store: TraceStore | None = None
    """The workdir's trace store (learning "workdir")."""
    watcher: DraftWatcher | None = None
    """Offers a learner process's drafts to the channel (learning "workdir"; started)."""

    @property
    def engine(self) -> Engine:
        """The primary engine."""
        return next(iter(self.engines.values()))

    def run(self, requests: Sequence[Request],
            on_result: Callable[[RequestResult], None] | None = None, *,
            learn_per_request: int = 0) -> RunResult:
        """Serves `requests` on the primary engine while the draft learns: the learner steps
        `learn_per_request` times after each finished request (on a shared CPU a background
        thread barely gets to run), or as a background thread (0); drafts offered meanwhile
        are swapped in at step boundaries. What starts here stops (and traces are flushed)
        before it returns or raises."""
        if learn_per_request < 0:
            raise ConfigError(f"learn_per_request must be >= 0, got {learn_per_request}")
        online, callback = self.online, on_result
        if online is not None and learn_per_request > 0:
            def callback(res: RequestResult) -> None:  # interleaved: learn between requests
                if on_result is not None:
                    on_result(res)
                online.train_steps(learn_per_request)
        elif online is not None:
            online.start()
        try:
            return self.engine.run(requests, on_result=callback,
                                   before_step=self.channel.apply)
        finally:
            if self.engine.traces:  # the last step's trace is submitted after its results
                self.engine.traces.flush()
            if online is not None:
                online.stop()
            if self.watcher is not None and self.store is not None:
                self.watcher.stop()
                self.store.flush()

    def close(self) -> None:
        """Stops the learner and the draft watcher, ends each trace thread once every trace
        reached the learner or the store, and writes the store's last shard. A trace thread
        left running would crash the process's exit (engine/trace.py). Calling it again does
        nothing."""
        if self.online is not None:
            self.online.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for engine in self.engines.values():
            if engine.traces:
                engine.traces.close()
        if self.store is not None:
            self.store.flush()

    def __enter__(self) -> Stack:
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


def build_stack(cfg: StackConfig, target_dir: str | Path, *, max_slots: int,
                max_len: int | None = None, learning: Learning = "off",
                workdir: kvstore.Location | None = None, alternatives: bool = True,
                immediate: bool = False, guard: GuardConfig | None = None,
                trace_sink: Callable[[object], None] | None = None, stage: bool = False,
                poll_s: float = 1.0, sequences_per_shard: int = 8,
                eos_ids: Sequence[int] | None = None,
                models: tuple[Target, Draft | None, Tokenizer | None] | None = None) -> Stack:
    """The stack `cfg` describes over the checkpoint in `target_dir`.

    `alternatives`: also one engine per `cfg.adaptive` alternative and target-only (for an
    adaptive policy); otherwise the primary setting alone. `learning`: where the traces go
    (module docstring); `trace_sink` replaces that (learning "off" only: a process serving
    beside a multi-process job's primary, a trace store of an experiment's own). `immediate`:
    the channel swaps each offer in at once instead of at the owner's next step boundary.
    `stage`: the watcher only stages drafts for a multi-process serving loop. `max_len`
    defaults to the engine's; `eos_ids` to the tokenizer's stop tokens. `models`: already
    loaded (target, draft, tokenizer) instead of loading them here."""
    if trace_sink is not None and learning != "off":
        raise ConfigError(f"learning {learning} decides where traces go; a trace_sink of the "
                          "caller's is for learning off")
    learner_mesh = None
    if models is None:
        mesh = serving_mesh(cfg.tp)
        if learning == "thread" and cfg.learner.devices is not None:
            mesh, learner_mesh = placement.split_meshes(cfg.learner.devices, cfg.tp)
        models = load_models(cfg, target_dir, mesh)
    target, draft, tokenizer = models
    if learning != "off" and draft is None:
        raise ConfigError(f"learning {learning} trains a draft; there is none (draft: none)")
    if eos_ids is None:
        eos_ids = (tokenizer.stop_ids(target.cfg.eos_token_ids) if tokenizer is not None
                   else target.cfg.eos_token_ids)
    buffer = store = drafts = None
    sink = trace_sink
    if learning == "thread":
        buffer = TraceBuffer()
        sink = TraceAssembler(buffer.add)
    elif learning == "workdir":
        if workdir is None:
            raise ConfigError("learning workdir needs a workdir")
        traces, drafts = workdir_paths(workdir)
        store = TraceStore(traces, sequences_per_shard)
        # The learner's tree size is the primary setting's, whatever other engines (target-
        # only, prompt lookup) also write to the store. One key, written whole.
        kvstore.write_json(kvstore.open_store(workdir), ENGINE_KEY,
                           {"tree_size": cfg.spec.nodes + 1,
                            "spec": dataclasses.asdict(cfg.spec)})
        sink = TraceAssembler(store.add)
    engines = _engines(cfg, target, draft, alternatives, max_slots=max_slots, max_len=max_len,
                       eos_ids=tuple(eos_ids), trace_sink=sink, seed=cfg.seed)
    channel = DraftChannel(*engines.values(), guard=guard, immediate=immediate)
    stack = Stack(target, draft, tokenizer, engines, channel, store=store)
    if learning == "thread" and channel.engines:
        assert buffer is not None and draft is not None
        loss = dataclasses.replace(cfg.learner.loss, tree_depth=max(cfg.spec.max_depth, 1))
        learner = Learner(draft, target, loss, cfg.learner.optimizer, mesh=learner_mesh)
        stack.online = OnlineLearner(learner, buffer, channel, cfg.spec.nodes + 1,
                                     cfg.learner.online, keep_ids=tuple(eos_ids))
        channel.on_rollback.append(
            lambda r: stack.online.roll_back(r.state, r.bad_version))  # type: ignore[union-attr]
    elif learning == "workdir":
        assert drafts is not None
        watcher = DraftWatcher(channel, drafts, poll_s, stage=stage)
        channel.on_rollback.append(lambda r: watcher.refuse(r.bad_version, r.reason))
        watcher.poll()  # a learner that already published: start from its newest draft,
        channel.apply()  # at once (nothing steps yet), so that warm-up serves it too
        stack.watcher = watcher.start()
    return stack


def _engines(cfg: StackConfig, target: Target, draft: Draft | None, alternatives: bool,
             **engine_kwargs) -> dict[str, Engine]:
    """Mode name -> engine: "spec" first ("off" when the primary setting does not speculate),
    then with `alternatives` one per alternative setting and "off". N-gram settings propose
    without the draft: their engines skip its passes entirely. Target-only is the target
    alone (no draft catch-up): the speed speculation must beat. A stack without a draft whose
    primary setting needs one serves target-only."""
    if cfg.spec.mode == "off" or (draft is None and cfg.spec.needs_draft):
        return {"off": Engine(target, None, SpecConfig(mode="off"), **engine_kwargs)}
    settings = spec_modes(cfg.spec, cfg.adaptive) if alternatives else {"spec": cfg.spec}
    engines = {name: Engine(target, draft if s.needs_draft else None, s, **engine_kwargs)
               for name, s in settings.items()}
    if alternatives:
        engines["off"] = Engine(target, None, SpecConfig(mode="off"), **engine_kwargs)
    return engines


def single(spec: SpecConfig, **overrides) -> StackConfig:
    """A StackConfig serving `spec` alone (no alternatives)."""
    return StackConfig(spec=spec, adaptive=AdaptiveConfig(enabled=False), **overrides)


def online_engine(target: Target, draft: Draft, spec: SpecConfig, learner: Learner,
                  cfg: OnlineConfig | None = None, buffer: TraceBuffer | None = None,
                  **engine_kwargs) -> tuple[Engine, OnlineLearner]:
    """One engine whose traces feed a buffer, and the OnlineLearner over both (not started),
    publishing through an immediate channel: for launcher scripts and tests that step the
    engine themselves."""
    if draft is None:
        raise ConfigError("online learning needs a draft (say a scratch one) to train")
    buffer = TraceBuffer() if buffer is None else buffer
    engine = Engine(target, draft, spec, trace_sink=TraceAssembler(buffer.add), **engine_kwargs)
    channel = DraftChannel(engine)
    return engine, OnlineLearner(learner, buffer, channel, spec.nodes + 1,
                                 cfg or OnlineConfig(), keep_ids=engine.eos_ids)


def shared_engine(target: Target, draft: Draft, spec: SpecConfig, workdir: kvstore.Location,
                  *, poll_s: float = 1.0, sequences_per_shard: int = 8, stage: bool = False,
                  max_slots: int = 8, max_len: int | None = None,
                  eos_ids: Sequence[int] | None = None, seed: int = 0,
                  ) -> tuple[Engine, TraceStore, DraftWatcher]:
    """(engine, store, watcher): one engine whose traces go to `workdir`/traces and whose
    draft follows `workdir`/drafts through an immediate channel; the watcher is started.
    Call `store.flush()` (after `engine.traces.flush()`) and `watcher.stop()` when done."""
    if draft is None:
        raise ConfigError("a shared workdir needs a draft for the learner to train")
    stack = build_stack(single(spec, seed=seed), "", max_slots=max_slots, max_len=max_len,
                        learning="workdir", workdir=workdir, alternatives=False,
                        immediate=True, stage=stage, poll_s=poll_s,
                        sequences_per_shard=sequences_per_shard, eos_ids=eos_ids,
                        models=(target, draft, None))
    assert stack.store is not None and stack.watcher is not None
    return stack.engine, stack.store, stack.watcher

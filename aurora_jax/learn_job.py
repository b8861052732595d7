"""`aurora-jax learn --workdir DIR`: the learner half of a stack, in a process of its own. It
trains on the traces an engine writes to DIR (a directory or a kvstore URL) and publishes
drafts there, which the engine's watcher offers to its draft channel (learn/remote.py has the
loop; aurora_jax/stack.py the engine side)."""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

from aurora_jax import interrupt
from aurora_jax.builtin import resolve_target
from aurora_jax.errors import ConfigError
from aurora_jax.learn.online import OnlineLearner
from aurora_jax.learn.remote import run_learner
from aurora_jax.stack import StackConfig, load_models
from aurora_jax.store import kvstore
from aurora_jax.store.workdir import workdir_paths


@dataclasses.dataclass(frozen=True)
class LearnJobConfig(StackConfig):
    """`aurora-jax learn --workdir DIR --config YAML key=value ...`: a learner process that
    trains on the traces an engine writes to DIR (a directory or a kvstore URL) and publishes
    drafts there. Its keys are the stack's (aurora_jax/stack.py), the same the engine side
    was built from: target, draft, draft_vocab_size, dtype and seed must match the engine's
    (a workdir with published drafts resumes from the newest); the learner trains with
    `learner.online`, `learner.optimizer` and `learner.loss`. tp, spec and adaptive are the
    engine's business (the tree size comes from the workdir) and unused here."""

    RENAMED: ClassVar[dict[str, str]] = {"online": "learner.online",
                                         "optimizer": "learner.optimizer",
                                         "loss": "learner.loss"}
    """Keys of older configs, read with a deprecation warning."""


def learn(cfg: LearnJobConfig, workdir: kvstore.Location, cache_dir: str | None = None,
          progress: bool = True) -> OnlineLearner:
    """Runs the learner process until `cfg.learner.online.max_steps`, a Ctrl-C (after its
    step and any save, then `Interrupted` saying what it kept) or a learner error (raised);
    returns the stopped OnlineLearner."""
    from tqdm import tqdm

    path = resolve_target(cfg.target, cache_dir, log=lambda m: print(m, file=sys.stderr))
    target, draft, tokenizer = load_models(cfg, path, text=False)
    if draft is None:
        raise ConfigError("draft: none leaves the learner nothing to train")
    bar = tqdm(total=cfg.learner.online.max_steps, desc="learning", unit="step",
               file=sys.stderr, disable=not progress)

    def show(online, follower) -> None:
        m = online.last_metrics
        bar.update(online.steps - bar.n)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}" if m else "-",
                        sim_tau=f"{float(m['sim_acceptance_length']):.2f}" if m else "-",
                        version=online.publisher.version, sequences=follower.sequences,
                        refresh=False)

    print(f"learner: waiting for traces in {workdir_paths(workdir)[0]}", file=sys.stderr)
    stops = (tokenizer.stop_ids(target.cfg.eos_token_ids) if tokenizer is not None
             else None)  # the engine's stop tokens
    try:
        with interrupt.deferred():  # Ctrl-C: the learner stops after its step (and any save)
            online = run_learner(target, draft, workdir, cfg.learner.online, cfg.learner.loss,
                                 cfg.learner.optimizer, stop_ids=stops, on_progress=show,
                                 should_stop=interrupt.requested)
            interrupt.check(published(online, workdir))
    finally:
        bar.close()
    if online.error is not None:
        raise online.error
    return online


def published(online: OnlineLearner, workdir: kvstore.Location) -> str:
    """What an interrupted learner kept, for the Ctrl-C line (a path or a store URL)."""
    traces, drafts = workdir_paths(workdir)
    version = online.publisher.version
    if not version:
        return f"no draft published yet; the traces stay in {traces}"
    return (f"kept the drafts in {drafts} (newest version {version}, "
            f"{online.published} published by this run; the same command resumes from the "
            "newest)")

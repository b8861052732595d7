"""Which draft objective learns fastest from served traffic? A fair, seeded comparison.

Aurora (arXiv 2602.06932) claims that rejected proposals, used as negative feedback, improve
the sample efficiency of online speculator training. This experiment measures it:

1. Record once. The engine serves each domain's prompts with the day-0 draft (tree mode,
   greedy) and its traces go to a trace store per domain and split (train / held out).
2. Replay. For every scenario and seed the first `steps` batches of `replay_dataset` over the
   scenario's training store are cut once; every arm trains on exactly those batches in that
   order (each batch's fingerprint is recorded per arm, so a run shows it). Arms differ only
   in their rejected-node objective (`LossConfig`'s discard fields); the optimizer, the TTT
   term and the start draft are shared.
3. Measure. Every `eval_every` steps: the held-out simulated acceptance (greedy chain of TTT
   depth, from the target's features on the held-out store) and the learner seconds so far
   (steady-state step times: compilation is reported apart). At the end: the acceptance the
   engine serves with the arm's draft on held-out prompts (tree mode, greedy).
4. Report. Per scenario and arm, mean and std over seeds at equal steps (the last) and at equal
   learner seconds (the cheapest arm's budget, interpolated on each curve), the cost per step,
   and a plot of held-out acceptance against learner seconds with seed bands.

Scenarios: a domain from day 0 (the warm-started draft), or a domain after a shift (the start
draft is first trained, TTT only, on the other domain's traces).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.config_io import load_config
from aurora_jax.errors import ConfigError
from aurora_jax.learn.losses import LossConfig
from aurora_jax.speculative.config import SpecConfig

SHARED_LOSS_FIELDS = ("ttt_steps", "step_weight", "tree_depth", "tv_weight")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One objective. Every arm shares the experiment's TTT settings (`ttt_steps`)."""

    name: str
    """Its name in tables and plots."""
    loss: LossConfig = LossConfig(lambda_discard=0.0)
    """Its rejected-node term: lambda_discard and the discard_* fields (see learn/discard.py)."""

    def __post_init__(self):
        for f in SHARED_LOSS_FIELDS:
            if getattr(self.loss, f) != getattr(LossConfig(), f):
                raise ConfigError(f"arm {self.name!r}: {f} is shared by every arm; set it at "
                                  "the experiment's top level")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Which traffic the arms learn from, and from which start."""

    name: str
    """Its name in tables and plots."""
    domain: str
    """The domain whose traces are replayed (and whose held-out traffic scores)."""
    start: str = "day0"
    """"day0" (the warm-started draft) or another domain: start from a draft trained on that
    domain's traces first (TTT only, `shift_steps` steps): a domain shift."""
    arms: tuple[str, ...] = ()
    """The arms run here (empty: all)."""


DEFAULT_ARMS = (
    Arm("ttt"),
    Arm("kl", LossConfig(lambda_discard=0.5, discard="kl", discard_nodes="all")),
    Arm("kl-frontier", LossConfig(lambda_discard=0.5, discard="kl", discard_nodes="frontier")),
    Arm("unlikelihood", LossConfig(lambda_discard=0.5, discard="unlikelihood",
                                   discard_nodes="frontier")),
    Arm("tv", LossConfig(lambda_discard=0.5, discard="tv", discard_nodes="all")),
)


@dataclasses.dataclass(frozen=True)
class ObjectivesConfig:
    """The experiment (configs/exp_objectives.yaml documents every field)."""

    target: str = "builtin"
    """The target: "builtin" (SmolLM2-135M-Instruct), a checkpoint directory or a .gguf."""
    draft_vocab_size: int = 8192
    """The day-0 draft's vocabulary (the most frequent built-in corpus tokens)."""
    spec: SpecConfig = SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12)
    """How traces are recorded and how served acceptance is measured."""
    domains: tuple[str, ...] = ("code", "prose")
    """Domains to record (built-in: code, prose; prose is sent as a chat turn)."""
    train_requests: int = 48
    """Requests recorded per domain for training."""
    held_out_requests: int = 8
    """Requests recorded per domain for held-out scoring (other prompts)."""
    prompt_tokens: int = 64
    """Prompts are cut to this many tokens."""
    max_new_tokens: int = 64
    """Tokens generated per recorded request."""
    served_prompts: int = 4
    """Held-out prompts the engine serves with each final draft."""
    served_new_tokens: int = 32
    """Tokens generated per served held-out prompt."""
    steps: int = 100
    """Learner steps per arm."""
    eval_every: int = 20
    """Steps between held-out scorings."""
    eval_batches: int = 4
    """Held-out batches per scoring (fixed across arms and seeds)."""
    batch_size: int = 4
    """Sequences per learner batch."""
    seq_len: int = 64
    """Positions per sequence window."""
    trees_per_seq: int = 4
    """Verified trees per window."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate (every arm)."""
    ttt_steps: int = 3
    """TTT unroll (every arm; also the depth of the simulated acceptance)."""
    shift_steps: int = 200
    """Steps of TTT training on the other domain that make a shift scenario's start draft."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds: each gives its own batch order (and its own random draft weights, where the
    day-0 draft has any: the warm start copies the target's, so it has few)."""
    arms: tuple[Arm, ...] = DEFAULT_ARMS
    """The objectives compared."""
    scenarios: tuple[Scenario, ...] = (Scenario("code", "code"), Scenario("prose", "prose"),
                                       Scenario("prose-after-code", "prose", start="code"))
    """The scenarios."""

    def __post_init__(self):
        if min(self.train_requests, self.held_out_requests, self.steps, self.eval_every,
               self.eval_batches, self.batch_size, self.seq_len, self.trees_per_seq,
               self.ttt_steps, self.served_prompts, self.served_new_tokens) < 1:
            raise ConfigError("experiment counts and sizes must be >= 1")
        if not self.seeds or not self.arms:
            raise ConfigError("the experiment needs at least one seed and one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arm names must be unique, got {names}")
        for s in self.scenarios:
            unknown = [a for a in s.arms if a not in names]
            if unknown:
                raise ConfigError(f"scenario {s.name!r}: unknown arm(s) {unknown} "
                                  f"(arms: {names})")
            for d in (s.domain, s.start):
                if d != "day0" and d not in self.domains:
                    raise ConfigError(f"scenario {s.name!r}: domain {d!r} is not recorded "
                                      f"(domains: {list(self.domains)})")
        if self.served_prompts > self.held_out_requests:
            raise ConfigError("served_prompts must be <= held_out_requests")

    def arm_loss(self, arm: Arm) -> LossConfig:
        return dataclasses.replace(arm.loss, ttt_steps=self.ttt_steps,
                                   tree_depth=self.spec.max_depth)

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> ObjectivesConfig:
        return load_config(cls, path, overrides)


def fingerprint(batch) -> str:
    """What makes two batches the same data: tokens, lengths and trees (12 hex digits)."""
    h = hashlib.sha1()
    for name in ("tokens", "length", "tree_tokens", "tree_parent", "tree_root_pos",
                 "tree_accepted", "tree_valid"):
        h.update(np.ascontiguousarray(np.asarray(getattr(batch, name))).tobytes())
    h.update(np.asarray(batch.aux[..., :4], np.float32).tobytes())
    return h.hexdigest()[:12]


# ---- recording ---------------------------------------------------------------------------


def record_traces(cfg: ObjectivesConfig, target, draft, tok, root: Path, say=print) -> dict:
    """Serves every domain's train and held-out prompts with `draft` and writes their traces
    under root/traces/<domain>-<split>; kept from an earlier run when present. Returns the
    held-out prompts per domain (the served evaluation's)."""
    from aurora_jax.data.scenarios import ScenarioConfig, build_scenario
    from aurora_jax.engine.engine import Request
    from aurora_jax.learn.buffer import TraceAssembler
    from aurora_jax.stack import build_stack, single
    from aurora_jax.store.trace_store import TraceStore, list_shards

    prompts_file = root / "held_out_prompts.json"
    n = cfg.train_requests + cfg.held_out_requests
    chat = tok.chat_turn if tok.chat_template else None
    prompts = {}
    for domain in cfg.domains:
        stream = build_scenario(ScenarioConfig(domains=(domain,), requests=n,
                                               prompt_tokens=cfg.prompt_tokens,
                                               max_new_tokens=cfg.max_new_tokens),
                                tok.encode, chat)
        splits = {"train": stream[:cfg.train_requests], "held": stream[cfg.train_requests:]}
        prompts[domain] = [r.prompt for r in splits["held"]]
        for split, reqs in splits.items():
            store_dir = root / "traces" / f"{domain}-{split}"
            if store_dir.exists() and list_shards(store_dir):
                continue  # recorded by an earlier run over this directory
            say(f"recording {len(reqs)} {domain} {split} requests with the day-0 draft")
            partial = store_dir.with_name(store_dir.name + ".tmp")
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted recording
            store = TraceStore(partial, sequences_per_shard=8)
            engine = build_stack(single(cfg.spec), "", max_slots=1, eos_ids=(),
                                 max_len=max(len(r.prompt) for r in reqs) + cfg.max_new_tokens,
                                 alternatives=False, trace_sink=TraceAssembler(store.add),
                                 models=(target, draft, None)).engine
            emitter = engine.traces
            assert emitter is not None  # the engine has a trace sink
            for r in reqs:  # one at a time, flushed: the trace queue never overflows
                engine.run([Request(r.prompt, cfg.max_new_tokens, domain=domain)])
                emitter.flush()
            store.flush()
            emitter.close()
            if emitter.dropped:
                raise RuntimeError(f"{emitter.dropped} traces dropped while recording")
            store.root.rename(store_dir)
    prompts_file.write_text(json.dumps(prompts))
    return prompts


def cut_batches(store: Path, n: int, cfg: ObjectivesConfig, seed: int) -> list:
    """The first n batches of the store's replay for `seed`: the data every arm shares."""
    from aurora_jax.store.trace_store import replay_dataset

    it = iter(replay_dataset(store, cfg.batch_size, cfg.seq_len, cfg.trees_per_seq,
                             cfg.spec.nodes + 1, seed=seed))
    return list(itertools.islice(it, n))


# ---- training and scoring ------------------------------------------------------------------


def make_scorer(learner, ttt_steps: int):
    """(params, batch) -> metrics of the TTT-only objective: the simulated greedy chain
    acceptance of depth `ttt_steps` and the loss, on held-out batches. Compiled once; the
    target's arrays are arguments, not constants baked into the program."""
    from aurora_jax.learn.losses import draft_loss

    cfg = LossConfig(ttt_steps=ttt_steps, lambda_discard=0.0)
    graphdef = learner.graphdef
    fn = jax.jit(lambda params, buffers, embed, head, batch: draft_loss(
        nnx.merge(graphdef, params, buffers), embed,
        lambda h: (h @ head).astype(jnp.float32), batch, cfg)[1])
    return lambda params, batch: fn(params, learner.buffers, learner.embed, learner.head, batch)


def held_out_acceptance(score, params, evals: list) -> float:
    return float(np.mean([float(score(params, e)["sim_acceptance_length"]) for e in evals]))


def train_arm(learner, batches: list, evals: list, score, eval_every: int) -> dict:
    """Trains `learner` on `batches` in order; returns its curve (step, learner seconds,
    held-out simulated acceptance), step times, the batches' fingerprints and last metrics."""
    curve, times, prints = [], [], []
    t_learn = 0.0
    metrics = {}
    for step in range(len(batches) + 1):
        if step % eval_every == 0 or step == len(batches):
            curve.append({"step": step, "steps_s": t_learn,
                          "held_out_sim_acceptance": held_out_acceptance(
                              score, learner.state.params, evals)})
        if step == len(batches):
            break
        prints.append(fingerprint(batches[step]))
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(learner.step(batches[step]))
        times.append(time.perf_counter() - t0)
        # Steady-state seconds: the first step's compilation is reported apart.
        t_learn += times[-1] if step else 0.0
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    for row in curve:  # the first step counted at the steady-state cost
        row["learn_s"] = row.pop("steps_s") + (steady if row["step"] else 0.0)
    return {"curve": curve, "step_s": steady, "compile_s": max(0.0, times[0] - steady),
            "fingerprints": prints,
            "last_metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}}


def served_acceptance(stack, learner, prompts: list, new_tokens: int) -> float:
    """The acceptance length the stack serves with the learner's draft on `prompts`."""
    from aurora_jax.engine.engine import Request

    stack.channel.offer(learner.publish())
    engine = stack.engine
    engine.forget_recent()
    run = engine.run([Request(p, new_tokens) for p in prompts])
    return float(run.acceptance_length or 1.0)


def interpolate(curve: list[dict], seconds: float) -> float:
    """Held-out acceptance at `seconds` of learning, linear between scorings."""
    xs = [r["learn_s"] for r in curve]
    ys = [r["held_out_sim_acceptance"] for r in curve]
    return float(np.interp(seconds, xs, ys))


# ---- the experiment ----------------------------------------------------------------------


def run_objectives(cfg: ObjectivesConfig, target_dir: Path, out: Path, say=None) -> dict:
    """Records (or reuses) the traces under `out`, runs every scenario x seed x arm, writes
    results.json, results.md and objectives.png there; returns the summary."""
    from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, Learner
    from aurora_jax.stack import StackConfig, build_stack, load_models, single

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    def warm(seed: int) -> StackConfig:  # the day-0 draft of `seed`
        return StackConfig(target=str(target_dir), draft="warm", dtype="float32", seed=seed,
                           draft_vocab_size=cfg.draft_vocab_size)

    target, day0, tok = load_models(warm(cfg.seeds[0]), target_dir)
    assert day0 is not None and tok is not None
    prompts = record_traces(cfg, target, day0, tok, out, say)
    opt = dataclasses.replace(DEFAULT_OPTIMIZER, learning_rate=cfg.learning_rate)
    served = build_stack(single(cfg.spec), target_dir, max_slots=1, eos_ids=(),
                         max_len=max(len(p) for ps in prompts.values() for p in ps)
                         + cfg.served_new_tokens, alternatives=False, immediate=True,
                         models=(target, day0, tok))
    evals = {d: cut_batches(out / "traces" / f"{d}-held", cfg.eval_batches, cfg, seed=12345)
             for d in cfg.domains}
    scorer = make_scorer(Learner(day0, target, LossConfig(lambda_discard=0.0), opt),
                         cfg.ttt_steps)
    arms = {a.name: a for a in cfg.arms}
    results: dict = {"scenarios": {}}
    for sc in cfg.scenarios:
        runs: dict = {name: [] for name in (sc.arms or arms)}
        for seed in cfg.seeds:
            _, start, _ = load_models(warm(seed), target_dir)
            assert start is not None
            if sc.start != "day0":  # the shift: first trained on the other domain (TTT only)
                pre = Learner(start, target, LossConfig(ttt_steps=cfg.ttt_steps,
                                                        lambda_discard=0.0), opt)
                for b in cut_batches(out / "traces" / f"{sc.start}-train", cfg.shift_steps,
                                     cfg, seed=seed + 1000):
                    pre.step(b)
                start = dataclasses.replace(start, state=pre.publish())
                say(f"[{sc.name} seed {seed}] start draft: {cfg.shift_steps} TTT steps on "
                    f"{sc.start}, held-out sim tau on {sc.domain} "
                    f"{held_out_acceptance(scorer, pre.state.params, evals[sc.domain]):.3f}")
            batches = cut_batches(out / "traces" / f"{sc.domain}-train", cfg.steps, cfg, seed)
            for name in runs:
                learner = Learner(start, target, cfg.arm_loss(arms[name]), opt)
                r = train_arm(learner, batches, evals[sc.domain], scorer, cfg.eval_every)
                r["served_acceptance"] = served_acceptance(
                    served, learner, prompts[sc.domain][:cfg.served_prompts],
                    cfg.served_new_tokens)
                r["seed"] = seed
                runs[name].append(r)
                last = r["curve"][-1]
                say(f"[{sc.name} seed {seed}] {name:14s} held-out sim tau "
                    f"{r['curve'][0]['held_out_sim_acceptance']:.3f} -> "
                    f"{last['held_out_sim_acceptance']:.3f}, served tau "
                    f"{r['served_acceptance']:.3f}, {r['step_s']:.2f} s/step")
        results["scenarios"][sc.name] = {"domain": sc.domain, "start": sc.start, "runs": runs}
    write_report(results, out)
    return results


def same_batches(results: dict) -> bool:
    """True when, in every scenario and seed, every arm trained on the same batches in the
    same order (by fingerprint)."""
    for sc in results["scenarios"].values():
        by_seed: dict = {}
        for runs in sc["runs"].values():
            for r in runs:
                by_seed.setdefault(r["seed"], set()).add(tuple(r["fingerprints"]))
        if any(len(v) != 1 for v in by_seed.values()):
            return False
    return True


def summarize(results: dict) -> dict:
    """Per scenario and arm: mean and std over seeds of the held-out simulated acceptance at
    equal steps (the last) and at equal learner seconds (the cheapest arm's mean budget), the
    served acceptance and the seconds per step; and each arm's paired difference from the
    scenario's first arm (same seed, so the same batches: the seed's own luck cancels)."""
    out = {}
    for name, sc in results["scenarios"].items():
        budget = min(np.mean([r["curve"][-1]["learn_s"] for r in runs])
                     for runs in sc["runs"].values())
        per_arm = {arm: {
            "start": [r["curve"][0]["held_out_sim_acceptance"] for r in runs],
            "equal_steps": [r["curve"][-1]["held_out_sim_acceptance"] for r in runs],
            "equal_seconds": [interpolate(r["curve"], budget) for r in runs],
            "served": [r["served_acceptance"] for r in runs],
            "step_s": [r["step_s"] for r in runs],
            "seed": [r["seed"] for r in runs],
        } for arm, runs in sc["runs"].items()}
        ref_name = next(iter(per_arm))
        ref = per_arm[ref_name]
        rows: dict[str, dict] = {}
        for arm, v in per_arm.items():
            row: dict = {k: _stat(v[k]) for k in ("start", "equal_steps", "equal_seconds", "served",
                                            "step_s")}
            row["seeds"] = len(v["seed"])
            for k in ("equal_steps", "equal_seconds", "served"):
                by_seed = dict(zip(ref["seed"], ref[k], strict=True))
                row[f"{k}_vs_{ref_name}"] = _stat([x - by_seed[s] for x, s in
                                                   zip(v[k], v["seed"], strict=True)])
            rows[arm] = row
        out[name] = {"budget_s": float(budget), "reference": ref_name, "arms": rows}
    return out


def _stat(xs) -> dict:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs))}


def markdown_table(summary: dict) -> str:
    f = lambda s, sign="": f"{s['mean']:{sign}.3f} ± {s['std']:.3f}"  # noqa: E731
    lines = []
    for name, sc in summary.items():
        ref = sc["reference"]
        lines += [f"**{name}** (equal seconds: {sc['budget_s']:.0f} s of learning; "
                  f"differences are paired by seed against {ref})", "",
                  "| objective | s/step | held-out sim tau, equal steps | vs " + ref +
                  " | equal seconds | vs " + ref + " | served tau | vs " + ref + " |",
                  "|---|---:|---|---|---|---|---|---|"]
        for arm, r in sc["arms"].items():
            lines.append(
                f"| {arm} | {r['step_s']['mean']:.2f} | {f(r['equal_steps'])} | "
                f"{f(r['equal_steps_vs_' + ref], '+')} | {f(r['equal_seconds'])} | "
                f"{f(r['equal_seconds_vs_' + ref], '+')} | {f(r['served'])} | "
                f"{f(r['served_vs_' + ref], '+')} |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> None:
    """results.json, results.md and objectives.png in `out` (again from results.json with
    `scripts/exp_objectives.py --report`)."""
    results["summary"] = summarize(results)
    results["same_batches"] = same_batches(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown_table(results["summary"]))
    plot_objectives(results, out / "objectives.png")


def plot_objectives(results: dict, path: Path) -> Path:
    """Held-out simulated acceptance against learner seconds, one panel per scenario, one
    line per objective (mean over seeds) with a band of ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    names = list(dict.fromkeys(a for sc in scenarios.values() for a in sc["runs"]))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.6),
                             squeeze=False)
    handles = {}
    for ax, (name, sc) in zip(axes[0], scenarios.items(), strict=True):
        for arm, runs in sc["runs"].items():
            color = f"C{names.index(arm) % 10}"  # one color per arm in every panel
            xs = np.mean([[p["learn_s"] for p in r["curve"]] for r in runs], 0)
            ys = np.array([[p["held_out_sim_acceptance"] for p in r["curve"]] for r in runs])
            m, s = ys.mean(0), ys.std(0)
            (handles[arm],) = ax.plot(xs, m, "-o", ms=3, color=color, label=arm)
            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.15)
        ax.set_title(name)
        ax.set_xlabel("learner seconds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out simulated tau")
    fig.legend([handles[a] for a in names], names, loc="lower center", ncol=min(len(names), 9),
               fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""`aurora-jax run --compare`: the paper's comparison on one traffic stream, in one
invocation. Four arms, each a full run (run/job.py) into its own directory:

  target-only     no draft
  static          an offline-trained draft that never changes (the EAGLE-3 baseline)
  online-scratch  a random draft that learns online (Aurora's day 0)
  online-static   the static draft, learning online from there

Reported per arm: acceptance length over the final window and tokens/s relative to
target-only, both from the side-by-side re-serving of the final window; plus the served
acceptance curve. Written: compare.json, compare.md and two plots.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from aurora_jax import interrupt
from aurora_jax.builtin import canonical_name
from aurora_jax.errors import ConfigError
from aurora_jax.run.config import RunConfig
from aurora_jax.run.job import run_job

ARMS = ("target-only", "static", "online-scratch", "online-static")


def static_draft(cfg: RunConfig, target_dir: Path, out: Path) -> str:
    """The static arm's draft: the configured one, or one trained here on the built-in
    corpus (the embedded target's own training split)."""
    if cfg.compare.static_draft:
        return cfg.compare.static_draft
    if canonical_name(cfg.target) not in ("builtin", "builtin-tiny"):
        raise ConfigError("--compare on a non-built-in target needs compare.static_draft "
                          "(a draft from `aurora-jax train-draft`)")
    from aurora_jax.data.corpus import training_documents
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.learn.offline import OfflineConfig, train_draft
    from aurora_jax.models.hf_io import load_target

    texts = [d.text for d in training_documents()]
    train_draft(load_target(target_dir), Tokenizer.load(target_dir), texts, out / "static",
                OfflineConfig(steps=cfg.compare.static_steps, seq_len=cfg.compare.static_seq_len,
                              learning_rate=cfg.learner.optimizer.learning_rate,
                              draft_vocab_size=cfg.draft_vocab_size,
                              ttt_steps=cfg.learner.loss.ttt_steps, seed=cfg.seed))
    return str(out / "static" / "draft")


def arm_config(cfg: RunConfig, arm: str, static: str) -> RunConfig:
    learner = lambda on: dataclasses.replace(cfg.learner, enabled=on)  # noqa: E731
    return {
        "target-only": dataclasses.replace(cfg, draft="none", learner=learner(False)),
        "static": dataclasses.replace(cfg, draft=static, learner=learner(False)),
        "online-scratch": dataclasses.replace(cfg, draft="scratch", learner=learner(True)),
        "online-static": dataclasses.replace(cfg, draft=static, learner=learner(True)),
    }[arm]


def run_compare(cfg: RunConfig, target_dir: Path, out: Path, progress: bool = True) -> dict:
    """Runs the arms one after the other into out/<arm>/ and compares them. Ctrl-C (under the
    CLI, interrupt.py) stops at once: the arms that finished are still compared (marked
    "interrupted"), and `Interrupted` says what was kept."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        static = static_draft(cfg, target_dir, out)
    except interrupt.Interrupted as e:
        raise interrupt.Interrupted(
            f"no arm ran yet; static draft: {e.kept or 'nothing kept'}") from None
    summaries: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    for arm in ARMS:
        if progress:
            print(f"compare: arm {arm}", flush=True)
        try:
            summaries[arm] = run_job(arm_config(cfg, arm, static), target_dir, out / arm,
                                     progress)
        except interrupt.Interrupted as e:
            done = "no arm finished"
            if summaries:
                _write(cfg, summaries, curves, static, out, interrupted=True)
                done = (f"the finished arms ({', '.join(summaries)}) compared in {out}/ "
                        "(compare.md, compare.json, plots)")
            raise interrupt.Interrupted(
                f"{done}; arm {arm}: {e.kept or 'nothing kept'}") from None
        curves[arm] = [json.loads(line) for line in
                       (out / arm / "metrics.jsonl").read_text().splitlines()]
    with interrupt.deferred(f"kept every arm, compared in {out}/ (compare.md, compare.json, "
                            "plots)"):  # a Ctrl-C here waits until they are written
        return _write(cfg, summaries, curves, static, out, progress=progress)


def _write(cfg: RunConfig, summaries: dict, curves: dict, static: str, out: Path, *,
           interrupted: bool = False, progress: bool = False) -> dict:
    """compare.md, compare.json and the plots of the arms in `summaries`."""
    rows = [{"arm": arm, "acceptance_length": s["acceptance_length"],
             "speedup_vs_target_only": s["speedup_vs_target_only"],
             "serving_tokens_per_s": s["tokens_per_s"],
             "speculative_windows": s["speculative_windows"], "windows": s["windows"],
             "learner_steps": s["learner_steps"]} for arm, s in summaries.items()]
    table = ["| arm | final-window tau | vs target-only | serving tok/s | spec windows |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {r['arm']} | {r['acceptance_length']:.2f} | "
              f"{r['speedup_vs_target_only']:.2f}x | {r['serving_tokens_per_s']:.1f} | "
              f"{r['speculative_windows']}/{r['windows']} |" for r in rows]
    (out / "compare.md").write_text("\n".join(table) + "\n")
    result = {"rows": rows, "static_draft": static, "config": dataclasses.asdict(cfg),
              "interrupted": interrupted}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    _plot(curves, rows, out)
    if progress:
        print("\n".join(table))
    return result


def _plot(curves: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, ms in curves.items():
        if arm == "target-only":
            continue
        ax.plot([m["requests"] for m in ms],
                [m["acceptance_length"] if m["mode"] == "spec" else float("nan") for m in ms],
                "o-", label=arm)
    ax.set(xlabel="requests served", ylabel="acceptance length",
           title="Acceptance length by arm (speculative windows)")
    if ax.get_legend_handles_labels()[0]:  # an interrupted comparison may have none
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare_acceptance.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["arm"] for r in rows], [r["speedup_vs_target_only"] for r in rows])
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set(ylabel="tokens/s vs target-only (final window)", title="Measured speedup")
    fig.tight_layout()
    fig.savefig(out / "compare_speedup.png", dpi=110)
    plt.close(fig)

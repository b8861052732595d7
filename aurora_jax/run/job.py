"""`aurora-jax run`: serve a traffic scenario with speculation while the draft learns online
(Aurora's loop), and write what happened.

The stream is served in windows of `window` requests. Before each window the utility
monitor picks the mode (speculative or target-only) from measured tokens/s; the window goes
through that engine (both share the target, the serving draft and the trace sink, so
target-only windows still feed the learner); after it, the learner takes its steps and
publishes into the speculative engine by hot swap. At the end, the final window's prompts are
served again both ways, side by side, for the speedup the summary reports.

Outputs in the run directory:
  generations.jsonl  one line per request (id, domain, window, mode, tokens, text, tau, ...)
  metrics.jsonl      one line per window (mode, tau, tokens/s, draft version, learner loss, ...)
  summary.json       totals, the final window, the side-by-side speedup, the config
  *.png              acceptance vs requests, tokens/s over time with swaps, tau per domain

Ctrl-C (under the CLI, interrupt.py) abandons the window being served and skips the
side-by-side: summary.json (marked "interrupted", its final-window numbers null) and the plots
cover the windows that finished, and `run_job` raises `Interrupted` saying what it kept.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from aurora_jax import interrupt
from aurora_jax.data.scenarios import build_scenario
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.adaptive import UtilityMonitor
from aurora_jax.engine.batcher import acceptance_length
from aurora_jax.engine.engine import Engine, Request
from aurora_jax.learn.online import OnlineLearner
from aurora_jax.models.eagle3_io import save_draft
from aurora_jax.run.config import RunConfig
from aurora_jax.stack import build_stack


def new_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


class _Writer:
    """Appends JSON lines, flushed per line: a run stopped midway keeps what it did."""

    def __init__(self, path: Path):
        self.f = path.open("w")

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def run_job(cfg: RunConfig, target_dir: Path, out: Path, progress: bool = True) -> dict:
    """Runs `cfg` on the checkpoint in `target_dir`, writing into `out`; returns the summary."""
    from tqdm import tqdm

    tok = Tokenizer.load(target_dir)
    chat = tok.chat_turn if tok.chat_template else None
    stream = build_scenario(cfg.scenario, tok.encode, chat)  # bad input fails here, early
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    max_len = max(len(r.prompt) for r in stream) + cfg.scenario.max_new_tokens
    # Every engine's traces feed the learner (target-only's carry the target's features at
    # every committed token too); the learner's drafts reach them through the channel, which
    # swaps each in before the next window.
    stack = build_stack(cfg, target_dir, max_slots=cfg.max_slots, max_len=max_len,
                        learning="thread" if cfg.learner.enabled else "off")
    draft, engines = stack.draft, stack.engines
    specs = {n: e.spec for n, e in engines.items() if n != "off"}
    online = stack.online
    monitor = UtilityMonitor(cfg.adaptive, modes=tuple(engines))

    gen_log, metric_log = _Writer(out / "generations.jsonl"), _Writer(out / "metrics.jsonl")
    windows = [stream[i:i + cfg.window] for i in range(0, len(stream), cfg.window)]
    load = min(cfg.max_slots, cfg.window)  # requests served at once: the policy's load
    bar = tqdm(total=len(stream), desc="serving", unit="req", disable=not progress,
               file=sys.stderr)
    rows, t_start, served, added = [], time.perf_counter(), 0, 0
    stopped = False  # by Ctrl-C (interrupt.py): what finished is still written below
    try:
        for w, chunk in enumerate(windows):
            mode = monitor.choose(load)
            engine = engines[mode]
            reqs = [Request(r.prompt, cfg.scenario.max_new_tokens, id=served + i,
                            domain=r.domain) for i, r in enumerate(chunk)]

            def log_generation(res, w=w, mode=mode):
                tau = res.acceptance_length
                gen_log({"id": res.id, "domain": res.domain, "window": w, "mode": mode,
                         "prompt_tokens": res.prompt_tokens, "token_ids": res.token_ids,
                         "text": tok.decode(res.token_ids), "finish_reason": res.finish_reason,
                         "acceptance_length": None if tau is None else round(tau, 4),
                         "steps": res.steps, "accepted": res.accepted,
                         "draft_version": max(res.draft_versions, default=None)})
                interrupt.check()  # (a held Ctrl-C: between two requests is a safe point)

            run = engine.run(reqs, on_result=log_generation)
            served += len(chunk)
            if engine.traces:
                engine.traces.flush()
            monitor.record(mode, run.generated_tokens, run.decode_s, load)
            outside = _outside_vocab(engines.get("spec"), run.results)
            learn = _learn(online, cfg, online.buffer.stats.added - added) if online else {}
            added = online.buffer.stats.added if online else 0
            stack.channel.apply()  # between windows: the learner's newest draft serves next
            row = {"window": w, "requests": served, "mode": mode,
                   "domains": sorted({r.domain for r in chunk}),
                   "tokens": run.generated_tokens, "decode_s": run.decode_s,
                   "compile_s": run.compile_s, "tokens_per_s": run.tokens_per_s,
                   "acceptance_length": run.acceptance_length or 1.0,
                   "draft_version": engines["spec"].draft_version if specs else None,
                   "load": load, "measured_speedup": monitor.speedup(load),
                   "best_spec": monitor.best_spec(load),
                   "spec_tokens_per_s": monitor.rates(load)[monitor.best_spec(load)],
                   "off_tokens_per_s": monitor.rates(load)["off"],
                   "mode_tokens_per_s": dict(monitor.rates(load)),
                   "break_even_acceptance": _break_even(run, mode, monitor.rates(load)),
                   "draft_vocab_outside": outside,
                   "elapsed_s": time.perf_counter() - t_start, **learn,
                   "per_domain_acceptance": _per_domain(run.results)}
            with interrupt.deferred():  # a window has finished once its row is written
                metric_log(row)
                rows.append(row)
            bar.update(len(chunk))
            bar.set_postfix(mode=mode, tau=f"{row['acceptance_length']:.2f}",
                            tok_s=f"{run.tokens_per_s:.0f}", v=row["draft_version"],
                            loss=f"{learn['learner_loss']:.2f}" if learn.get("learner_loss")
                            else "-", refresh=False)
    except interrupt.Interrupted:
        stopped = True
    finally:
        bar.close()
        gen_log.close()
        metric_log.close()
        stack.close()
    final: dict | None = None  # skipped after a Ctrl-C: the summary says "interrupted"
    if not stopped:
        try:
            final = _side_by_side({n: engines[n] for n in ("off", monitor.best_spec(load))
                                   if n in engines},
                                  windows[-1], cfg, served)
        except interrupt.Interrupted:
            pass
    kept = _kept(out, rows, len(stream), online is not None)
    with interrupt.deferred(kept):  # a Ctrl-C here waits until the outputs are whole
        summary = _summary(cfg, rows, final, online, time.perf_counter() - t_start)
        summary["spec_settings"] = {n: dataclasses.asdict(s) for n, s in specs.items()}
        summary["measured_tokens_per_s"] = dict(monitor.rates(load))
        if online is not None and draft is not None:  # the served draft (HF EAGLE-3 layout)
            summary["draft_vocab"] = _vocab_report(online, draft, rows)
            save_draft(out / "draft",
                       dataclasses.replace(draft, state=engines["spec"].draft_state))
            summary["draft_dir"] = str(out / "draft")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        from aurora_jax.run.report import plot_run

        if rows:
            plot_run(rows, out, {n: s.label for n, s in specs.items()})
    if final is None:
        raise interrupt.Interrupted(kept)
    return summary


def summary_line(s: dict) -> str:
    """A finished run's summary (`run_job`'s) in one line."""
    f = s["final_window"]
    return (f"{s['requests']} requests, {s['generated_tokens']} tokens, "
            f"{s['tokens_per_s']:.1f} tokens/s while serving; final window: acceptance "
            f"{s['acceptance_length']:.2f}, {s['speedup_vs_target_only']:.2f}x target-only "
            f"({f.get('spec_tokens_per_s', f['target_only_tokens_per_s']):.1f} vs "
            f"{f['target_only_tokens_per_s']:.1f} tokens/s); {s['learner_steps']} learner "
            f"steps, {s['drafts_published']} drafts published.")


def _kept(out: Path, rows: list[dict], requests: int, draft: bool) -> str:
    """What a run stopped by Ctrl-C keeps, for the CLI's one line."""
    if not rows:
        return (f"no window finished; kept {out}/ (config.json, summary.json, the requests "
                "that finished in generations.jsonl)")
    files = "generations.jsonl, metrics.jsonl, summary.json, plots" + (", draft/" if draft
                                                                      else "")
    windows = f"{len(rows)} finished window" + ("s" if len(rows) > 1 else "")
    return f"kept {windows} ({rows[-1]['requests']} of {requests} requests) in {out}/ ({files})"


def _break_even(run, mode: str, rates: dict) -> float | None:
    """The acceptance length at which this window's speculation would have run exactly as
    fast as the target alone: its step time over target-only's (tau x off rate / own rate)."""
    off = rates.get("off")
    if mode == "off" or not off or not run.tokens_per_s:
        return None
    return (run.acceptance_length or 1.0) * off / run.tokens_per_s


def _outside_vocab(engine: Engine | None, results) -> float | None:
    """Share of the window's generated tokens that the serving draft's vocabulary lacks
    (None without a reduced-vocabulary draft)."""
    if engine is None:
        return None
    t2d = np.asarray(engine.draft_state["t2d"][...])
    ids = np.concatenate([np.asarray(r.token_ids, np.int64) for r in results]
                         or [np.zeros(0, np.int64)])
    return float(1.0 - t2d[ids.astype(np.int64)].mean()) if ids.size else None


def _learn(online: OnlineLearner, cfg: RunConfig, fresh: int) -> dict:
    """The window's learner steps; first, the draft's simulated acceptance on the `fresh`
    sequences just served, which it has not trained on yet."""
    if not online.ready():
        return {"learner_steps": online.steps, "learn_s": 0.0}
    t0 = time.perf_counter()
    fresh_tau = online.fresh_acceptance(fresh) if fresh else None
    for _ in range(cfg.learner.steps_per_window):
        with interrupt.deferred():  # never inside a step: it donates the learner's state
            online.train_step()
    m = {k: float(v) for k, v in jax.device_get(online.last_metrics).items()}
    return {"learner_steps": online.steps, "learn_s": time.perf_counter() - t0,
            "learner_loss": m["loss"], "learner_sim_acceptance": m["sim_acceptance_length"],
            "learner_fresh_sim_acceptance": fresh_tau,
            "drafts_published": online.published}


def _vocab_report(online: OnlineLearner, draft, rows: list[dict]) -> dict:
    """The draft vocabulary against the served tokens: the share outside it at the start
    (the day-0 vocabulary) and at the end, over every token served (prompts included), the
    re-choices made, and per window the share of generated tokens outside the vocabulary
    that served them."""
    from aurora_jax.learn.vocab_refresh import draft_ids, outside_share

    counts = online.counts.snapshot()
    return {"size": int(draft.cfg.draft_vocab_size),
            "outside_share_start": outside_share(counts, draft_ids(draft.state["d2t"][...])),
            "outside_share_end": online.vocab_outside_share(),
            "changes": online.vocab_changes,
            "outside_share_generated_per_window": [r["draft_vocab_outside"] for r in rows]}


def _per_domain(results) -> dict:
    out = {}
    for d in sorted({r.domain for r in results}):
        rs = [r for r in results if r.domain == d]
        out[d] = acceptance_length(sum(r.accepted for r in rs), sum(r.steps for r in rs)) or 1.0
    return out


def _side_by_side(engines, chunk, cfg: RunConfig, first_id: int) -> dict:
    """The final window's prompts served again target-only and with the best measured
    speculation setting, alternately, twice (greedy), side by side so that machine noise
    hits both alike."""
    reqs = [Request(r.prompt, cfg.scenario.max_new_tokens, id=first_id + i, domain=r.domain)
            for i, r in enumerate(chunk)]
    for e in engines.values():  # the final check must not feed the learner
        e.traces = None
    runs: dict[str, list] = {name: [] for name in engines}
    for _ in range(2):
        for name, e in engines.items():
            e.forget_recent()  # n-gram lookups must not find this window's earlier outputs
            runs[name].append(e.run(reqs))
    rate = {n: sum(r.generated_tokens for r in rs) / sum(r.decode_s for r in rs)
            for n, rs in runs.items()}
    outputs = {n: [r.token_ids for r in rs[-1].results] for n, rs in runs.items()}
    final = {"target_only_tokens_per_s": rate["off"], "requests": len(reqs)}
    spec = [n for n in engines if n != "off"]
    if spec:
        (name,) = spec
        final.update({
            "spec_setting": name, "spec_tokens_per_s": rate[name],
            "speedup_vs_target_only": rate[name] / rate["off"],
            "acceptance_length": runs[name][-1].acceptance_length or 1.0,
            "greedy_outputs_equal": outputs[name] == outputs["off"]})  # lossless check
    return final


def _summary(cfg: RunConfig, rows: list[dict], final: dict | None, online,
             wall_s: float) -> dict:
    """Totals over the finished windows; `final` is the side-by-side (None: the run was
    interrupted before it, and the final-window numbers are null)."""
    tokens = sum(r["tokens"] for r in rows)
    decode = sum(r["decode_s"] for r in rows)
    return {
        "requests": rows[-1]["requests"] if rows else 0,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / decode if decode else 0.0,
        "acceptance_length": None if final is None else final.get("acceptance_length", 1.0),
        "speedup_vs_target_only": (None if final is None
                                   else final.get("speedup_vs_target_only", 1.0)),
        "final_window": final,
        "interrupted": final is None,
        "windows": len(rows),
        "speculative_windows": sum(r["mode"] != "off" for r in rows),
        "learner_steps": online.steps if online else 0,
        "drafts_published": online.published if online else 0,
        "seconds": {"wall": wall_s, "decode": decode,
                    "compile": sum(r["compile_s"] for r in rows),
                    "learn": sum(r.get("learn_s", 0.0) for r in rows)},
    }

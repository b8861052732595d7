"""Load benchmark of `aurora-jax serve`: the same Poisson traffic against target-only, a
static draft, a draft learning online, and the server's default (the adaptive policy over
the tree, prompt lookup and target-only, with online learning), one server per setting,
measured by a client.

    python scripts/bench_serve.py --out runs/bench_serve            # built-in SmolLM2
    python scripts/bench_serve.py --target PATH --requests 48 --rate 2 --settings online

Per setting: throughput (generated tokens / wall time of the run), time to first token and
inter-token latency p50/p99, end-to-end p50/p99, acceptance length (from the responses'
usage), the share of requests each speculation setting served, and the draft versions
served, hot swaps and their latency (from /metrics, over the measured requests only).
`--warmup N` requests are sent first and not measured: a server's first requests compile the
shapes they need, which says nothing of its speed afterwards. Writes results.json,
results.md (one table) and serve_bench.png (acceptance of each request over time, and
tokens/s per setting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from aurora_jax.builtin import resolve_target
from aurora_jax.data.scenarios import ScenarioConfig, build_scenario
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.serve.config import ServeConfig, ServeLearner
from aurora_jax.serve.loadgen import drive, scrape, summarize
from aurora_jax.speculative.config import SpecConfig

SETTINGS = ("target-only", "static", "online", "adaptive")


def setting_config(name: str, args, target: str) -> ServeConfig:
    spec = SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12)
    common = dict(target=target, max_slots=args.slots, port=0, model_name="bench",
                  max_len=args.prompt_tokens + args.max_tokens + 8, max_queue=args.requests)
    if name == "target-only":
        return ServeConfig(draft="none", spec=SpecConfig(mode="off"),
                           learner=ServeLearner(mode="off"), **common)
    if name == "static":
        return ServeConfig(draft=args.static_draft, spec=spec, window_steps=None,
                           learner=ServeLearner(mode="off"), **common)
    if name == "online":
        return ServeConfig(draft="warm", spec=spec, window_steps=None,
                           learner=ServeLearner(mode="thread"), **common)
    # The server's defaults: windows choose among the tree, prompt lookup and target-only by
    # measured tokens/s, while the draft learns in idle time.
    return ServeConfig(draft="warm", spec=spec, learner=ServeLearner(mode="thread"), **common)


def run_setting(cfg: ServeConfig, target_dir: Path, prompts: list[str], warmup: list[str],
                args) -> dict:
    from aurora_jax.serve.server import Server, serving_in_thread

    t0 = time.perf_counter()
    server = Server(cfg, target_dir)
    server.loop.ready.wait()
    startup = time.perf_counter() - t0
    with serving_in_thread(server) as url:
        if warmup:  # all at once: compiles the prompt shapes a burst and a trickle need
            asyncio.run(drive(url, "bench", warmup, rate=1e3, max_tokens=args.max_tokens,
                              seed=args.seed + 1))
        before = scrape(url)
        rows = asyncio.run(drive(url, "bench", prompts, rate=args.rate,
                                 max_tokens=args.max_tokens, seed=args.seed))
        after = scrape(url)
    metrics = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out = {"summary": summarize(rows), "rows": rows, "startup_s": startup,
           "hot_swaps": metrics.get("aurora_jax:draft_hot_swaps_total", 0.0),
           "rollbacks": metrics.get("aurora_jax:draft_rollbacks_total", 0.0),
           "learner_steps": metrics.get("aurora_jax:learner_steps", 0.0),
           "adaptive": server.loop.policy.status()}
    n = metrics.get("aurora_jax:draft_hot_swap_latency_seconds_count", 0.0)
    out["hot_swap_latency_mean_s"] = (metrics["aurora_jax:draft_hot_swap_latency_seconds_sum"]
                                      / n if n else None)
    return out


def table(results: dict) -> str:
    lines = ["| setting | tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | e2e p50 / p99 (s) "
             "| acceptance | hot swaps (mean latency) | served by |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        s = r["summary"]
        swap = (f"{r['hot_swaps']:.0f} ({r['hot_swap_latency_mean_s'] * 1e3:.1f} ms)"
                if r["hot_swap_latency_mean_s"] is not None else "-")
        lines.append(
            f"| {name} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s']:.2f} / "
            f"{s['ttft_p99_s']:.2f} | {s['itl_p50_s'] * 1e3:.0f} / {s['itl_p99_s'] * 1e3:.0f} | "
            f"{s['e2e_p50_s']:.1f} / {s['e2e_p99_s']:.1f} | "
            f"{(s['acceptance_length'] or 1.0):.2f} | {swap} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(s["speculation"].items())) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        rows = [x for x in r["rows"] if x["acceptance_length"] is not None]
        a.plot([x["done_s"] for x in rows], [x["acceptance_length"] for x in rows], "o-",
               ms=3, label=name)
    a.set_xlabel("seconds into the run (request finished)")
    a.set_ylabel("acceptance length of the request")
    a.legend()
    b.bar(list(results), [r["summary"]["tokens_per_s"] for r in results.values()])
    b.set_ylabel("generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin")
    ap.add_argument("--static-draft", default="warm",
                    help="the static arm's draft: an EAGLE-3 directory (e.g. from train-draft) "
                         "or warm (the day-0 draft, never trained)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8,
                    help="requests sent at once before the measured ones (not measured): they "
                         "compile the prompt shapes, and the adaptive policy makes its first "
                         "trials on them; 0: measure from a cold server")
    ap.add_argument("--rate", type=float, default=0.5, help="mean arrivals per second")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_serve")
    args = ap.parse_args()
    target_dir = resolve_target(args.target, None, log=lambda m: print(m, file=sys.stderr))
    tok = Tokenizer.load(target_dir)
    stream = build_scenario(ScenarioConfig(requests=args.warmup + args.requests, order="mixed",
                                           prompt_tokens=args.prompt_tokens, chat_domains=()),
                            tok.encode)
    prompts = [tok.decode(r.prompt) for r in stream]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.settings:
        print(f"{name}: serving {len(prompts)} requests at {args.rate}/s ...", file=sys.stderr,
              flush=True)
        results[name] = run_setting(setting_config(name, args, str(target_dir)), target_dir,
                                    prompts[args.warmup:], prompts[:args.warmup], args)
        print(table({name: results[name]}), flush=True)
    meta = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({"args": meta, "results": results}, indent=2))
    (out / "results.md").write_text(table(results))
    plot(results, out / "serve_bench.png")
    print(table(results))
    print(f"wrote {out}/results.json, results.md, serve_bench.png")


if __name__ == "__main__":
    main()

"""Soak `aurora-jax serve`: load, hot swaps and injected faults for a bounded time, then the
checks of aurora_jax/testing/soak.py (nothing wrong, lost or leaked); exits 1 if any failed.

    python scripts/soak.py --out runs/soak                      # SmolLM2, 10 minutes
    python scripts/soak.py --duration 3600 --rate 1 --out runs/soak-1h

Writes report.json (every request's outcome is summarized; events with their times),
report.md (the table for an issue note) and the learner processes' logs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aurora_jax.builtin import resolve_target
from aurora_jax.config_io import load_config
from aurora_jax.data.scenarios import ScenarioConfig, build_scenario
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.serve.config import ServeConfig
from aurora_jax.testing.soak import SoakConfig, failures, run_soak, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second")
    ap.add_argument("--prompts", type=int, default=24, help="distinct prompts (cycled)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("serve", nargs="*", help="serve config overrides (key=value)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    target_dir = resolve_target(args.target, None, log=lambda m: print(m, file=sys.stderr))
    serve = load_config(ServeConfig, None, [f"target={target_dir}", "learner.mode=workdir",
                                            "learner.workdir=unused", *args.serve])
    tok = Tokenizer.load(target_dir)
    stream = build_scenario(ScenarioConfig(requests=args.prompts, order="mixed",
                                           prompt_tokens=48, chat_domains=()), tok.encode)
    d = args.duration
    cfg = SoakConfig(duration_s=d, rate=args.rate, max_tokens=args.max_tokens,
                     learner_kill_every_s=max(d / 4, 30), bad_draft_every_s=max(d / 12, 10),
                     disk_full_at_s=(d / 3, 2 * d / 3), disk_full_s=min(30.0, d / 10))
    report = run_soak(serve, target_dir, [tok.decode(r.prompt) for r in stream], cfg, args.out)
    print(table(report))
    bad = failures(report)
    for line in bad:
        print("FAILED:", line, file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Which draft objective learns fastest from served traffic? Rejected proposals as negative
feedback against TTT alone, over seeds, at equal steps and equal learner seconds
(aurora_jax/experiments/objectives.py). Writes results.json, results.md and objectives.png.

    python scripts/exp_objectives.py --config configs/exp_objectives.yaml --out runs/objectives
    python scripts/exp_objectives.py steps=20 seeds=[0]        # a quick look
    python scripts/exp_objectives.py --report runs/objectives  # tables and plot again
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aurora_jax.builtin import resolve_target
from aurora_jax.experiments.objectives import ObjectivesConfig, run_objectives, write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/exp_objectives.yaml")
    ap.add_argument("--out", default="runs/objectives")
    ap.add_argument("--report", default=None, metavar="DIR",
                    help="only rewrite DIR's table and plot from its results.json")
    ap.add_argument("overrides", nargs="*", help="key=value settings over the config")
    args = ap.parse_args()
    if args.report:
        out = Path(args.report)
        write_report(json.loads((out / "results.json").read_text()), out)
        print((out / "results.md").read_text())
        return
    cfg = ObjectivesConfig.load(args.config, args.overrides)
    results = run_objectives(cfg, resolve_target(cfg.target), Path(args.out))
    print((Path(args.out) / "results.md").read_text())
    print(f"same batches in the same order for every arm: {results['same_batches']}")


if __name__ == "__main__":
    main()

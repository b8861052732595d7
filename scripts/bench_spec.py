"""Speculative versus target-only decoding, measured side by side in one run.

For each batch size, the same prompts (held-out standard-library files cut to the same token
length) go through three engines that differ only in their speculation setting: off
(target-only), chain and tree. Each is run once to compile, then --repeats times alternately,
and the median is kept, so machine noise hits all alike. Stop tokens are ignored (every request
generates exactly --new-tokens) so the work is equal. Reported per setting: tokens/s, its ratio
to target-only, acceptance length (tokens committed per verification step, bonus included) and
target forwards per generated token, milliseconds per engine step, and the break-even
acceptance length (a speculative step's cost in target-only steps: above it, speculation
pays). Greedy outputs are checked equal across settings.

    python scripts/bench_spec.py --target ../shared/fixtures/llama-code-16m --draft scratch

A scratch (random) draft accepts almost nothing, so it measures the cost of speculating; the
wall-clock gain needs a trained draft (`--draft PATH`) and, on CPU, a target costly enough for
a wide verification to pay (see ../shared/tools/widen_llama.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax

from aurora_jax.data.prompts import stdlib_code_prompts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.engine import Engine, Request
from aurora_jax.models.eagle3 import DraftConfig
from aurora_jax.models.eagle3_io import init_draft, load_draft, read_draft_config
from aurora_jax.models.hf_io import load_target
from aurora_jax.spec.draft import SpecConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--draft", default="scratch", help="'scratch' or an EAGLE-3 directory")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--num-draft-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/spec.json")
    args = ap.parse_args()

    target_dir = Path(args.target)
    if args.draft == "scratch":
        target = load_target(target_dir)
        draft = init_draft(DraftConfig.for_target(target.cfg), seed=0)
    else:
        aux = read_draft_config(args.draft).aux_layers
        target = load_target(target_dir, cfg_overrides={"aux_layers": tuple(aux)} if aux
                             else None)
        draft = load_draft(args.draft, target=target.cfg)
    tok = Tokenizer.load(target_dir)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = stdlib_code_prompts(target_dir, tok, max(batches), args.prompt_tokens)
    specs = {"off": SpecConfig(mode="off"),
             "chain": SpecConfig(mode="chain", depth=args.depth),
             "tree": SpecConfig(mode="tree", depth=args.depth, topk=args.topk,
                                num_draft_tokens=args.num_draft_tokens)}
    rows = []
    for b in batches:
        reqs = [Request(p, args.new_tokens) for p in prompts[:b]]
        max_len = args.prompt_tokens + args.new_tokens
        engines = {name: Engine(target, None if s.mode == "off" else draft, s, max_slots=b,
                                max_len=max_len, eos_ids=()) for name, s in specs.items()}
        runs = {name: [e.run(reqs)] for name, e in engines.items()}  # compile + warm-up
        for _ in range(args.repeats):
            for name, e in engines.items():
                runs[name].append(e.run(reqs))
        outputs = {name: [r.token_ids for r in rs[-1].results] for name, rs in runs.items()}
        assert all(o == outputs["off"] for o in outputs.values()), "greedy outputs differ"
        base = statistics.median(r.tokens_per_s for r in runs["off"][1:])
        base_step = statistics.median(r.decode_s / r.steps for r in runs["off"][1:])
        for name, rs in runs.items():
            last = rs[-1]
            tps = statistics.median(r.tokens_per_s for r in rs[1:])
            step_s = statistics.median(r.decode_s / r.steps for r in rs[1:])
            generated = last.generated_tokens
            forwards = sum(r.target_forwards for r in last.results)
            rows.append({
                "batch": b, "spec": name, "tokens_per_s": round(tps, 1),
                "speedup_vs_target_only": round(tps / base, 3),
                "acceptance_length": round(last.acceptance_length or 1.0, 3),
                "target_forwards_per_token": round(forwards / generated, 3),
                "engine_steps": last.steps, "step_ms": round(step_s * 1e3, 2),
                # Speculation pays once tau exceeds this: the cost of a speculative step in
                # target-only steps (each emits one token per slot).
                "break_even_tau": round(step_s / base_step, 2),
                "compile_s": round(rs[0].compile_s, 1)})
    print(f"{'batch':>5} {'spec':>6} {'tok/s':>8} {'vs off':>7} {'tau':>6} {'fwd/tok':>8} "
          f"{'step ms':>8} {'break-even tau':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['spec']:>6} {r['tokens_per_s']:>8} "
              f"{r['speedup_vs_target_only']:>7} {r['acceptance_length']:>6} "
              f"{r['target_forwards_per_token']:>8} {r['step_ms']:>8} {r['break_even_tau']:>15}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "target": str(target_dir), "draft": args.draft, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "depth": args.depth, "topk": args.topk,
        "num_draft_tokens": args.num_draft_tokens, "repeats": args.repeats,
        "jax": jax.__version__, "machine": platform.machine(), "devices": str(jax.devices()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

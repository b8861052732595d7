"""Online draft learning versus static drafts, measured on the same traffic in one run.

Arms, all on one target and the same held-out evaluation prompts:
  (a) a random (scratch) draft;
  (b) a static offline-trained draft (--offline-draft, from `aurora-jax train-draft`);
  (c) online from scratch: the engine serves --rounds rounds of --round-requests training
      requests (standard-library code not in the checkpoint's held-out list); after each round
      the learner takes --steps-per-round steps on the traces served so far and the engine
      swaps the new draft in;
  (d) the same as (c) with lambda_discard = 0 (no rejected-node term), on the same requests
      and the same number of learner steps.
Rounds are synchronous (serve, then learn), so the comparison of (c) and (d) does not depend
on how the two threads would share this machine's cores. At the end every arm is evaluated
interleaved on the held-out prompts (greedy, stop tokens ignored, every request makes
--new-tokens): acceptance length (tau), tokens/s and its ratio to target-only; plus tau on
the last round of training traffic, and for the online arms tau per round as served (the
learning curve). The online drafts are saved beside the JSON.

    python scripts/bench_online.py --target ../shared/fixtures/llama-code-16m \\
        --offline-draft runs/offline/draft
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax

from aurora_jax.data.prompts import stdlib_code_prompts, stdlib_traffic_prompts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.engine import Engine, Request
from aurora_jax.learn.buffer import TraceAssembler, TraceBuffer
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, Learner
from aurora_jax.learn.losses import LossConfig
from aurora_jax.models.eagle3 import DraftConfig
from aurora_jax.models.eagle3_io import init_draft, load_draft, read_draft_config, save_draft
from aurora_jax.models.hf_io import load_target
from aurora_jax.speculative.config import SpecConfig


def evaluate(target, drafts: dict, spec, prompts, traffic, new_tokens, repeats, slots):
    """Every arm on the held-out prompts, interleaved (each repeat runs all arms in turn, so
    machine noise hits them alike): median tokens/s and tau; plus tau on `traffic`."""
    engines = {name: Engine(target, d, spec if d is not None else SpecConfig(mode="off"),
                            max_slots=slots, max_len=len(prompts[0]) + new_tokens, eos_ids=())
               for name, d in drafts.items()}
    reqs = [Request(p, new_tokens) for p in prompts]
    runs = {name: [e.run(reqs)] for name, e in engines.items()}  # compile
    for _ in range(repeats):
        for name, e in engines.items():
            runs[name].append(e.run(reqs))
    served = [Request(p, new_tokens) for p in traffic]
    return {name: {"tokens_per_s": statistics.median(r.tokens_per_s for r in rs[1:]),
                   "acceptance_length": rs[-1].acceptance_length or 1.0,
                   "traffic_acceptance_length": engines[name].run(served).acceptance_length
                   or 1.0,
                   "outputs": [r.token_ids for r in rs[-1].results]}
            for name, rs in runs.items()}


def online(target, spec, loss: LossConfig, traffic, args):
    """Serve the traffic in rounds from a scratch draft, learning between rounds."""
    draft = init_draft(DraftConfig.for_target(target.cfg), seed=args.seed)
    buffer = TraceBuffer(max_bytes=1 << 30)
    engine = Engine(target, draft, spec, max_slots=args.round_requests,
                    max_len=args.prompt_tokens + args.new_tokens, eos_ids=(),
                    trace_sink=TraceAssembler(buffer.add))
    opt = dataclasses.replace(DEFAULT_OPTIMIZER, learning_rate=args.lr)
    learner = Learner(draft, target, loss, opt)
    curve, steps, t_learn = [], 0, 0.0
    for r in range(args.rounds):
        chunk = traffic[r * args.round_requests:(r + 1) * args.round_requests]
        served = engine.run([Request(p, args.new_tokens) for p in chunk])
        engine.traces.flush()
        t0 = time.perf_counter()
        for _ in range(args.steps_per_round):
            m = learner.step(buffer.batch(args.batch_size, args.seq_len, args.trees,
                                          spec.nodes + 1))
            steps += 1
        jax.block_until_ready(m["loss"])
        t_learn += time.perf_counter() - t0
        engine.set_draft(learner.publish())
        curve.append({"round": r + 1, "requests": (r + 1) * args.round_requests,
                      "served_tau": served.acceptance_length or 1.0,
                      "served_tokens_per_s": served.tokens_per_s,
                      "loss": float(m["loss"]), "sim_tau": float(m["sim_acceptance_length"])})
        print(f"  round {r + 1}: served tau {curve[-1]['served_tau']:.2f}, "
              f"loss {curve[-1]['loss']:.3f}, sim tau {curve[-1]['sim_tau']:.2f}", flush=True)
    draft.state = learner.publish()
    return draft, curve, {"learner_steps": steps, "learner_s": t_learn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--offline-draft", help="EAGLE-3 directory from `aurora-jax train-draft`")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=1, help="engine slots when evaluating")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--round-requests", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--trees", type=int, default=8)
    ap.add_argument("--ttt-steps", type=int, default=3)
    ap.add_argument("--lambda-discard", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results/online.json")
    args = ap.parse_args()

    target_dir = Path(args.target)
    target = load_target(target_dir)
    tok = Tokenizer.load(target_dir)
    spec = SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12)
    eval_prompts = stdlib_code_prompts(target_dir, tok, args.eval_prompts, args.prompt_tokens)
    traffic = stdlib_traffic_prompts(target_dir, tok, args.rounds * args.round_requests,
                                     args.prompt_tokens, seed=args.seed)
    drafts, curves, learn = {"target-only": None}, {}, {}
    drafts["random"] = init_draft(DraftConfig.for_target(target.cfg), seed=args.seed)
    if args.offline_draft:
        aux = read_draft_config(args.offline_draft).aux_layers
        if aux and tuple(aux) != target.cfg.resolved_aux_layers:
            raise SystemExit(f"the offline draft reads aux layers {aux}, the target gives "
                             f"{target.cfg.resolved_aux_layers}")
        drafts["offline"] = load_draft(args.offline_draft, target=target.cfg)
    out = Path(args.out)
    for name, lam in (("online", args.lambda_discard), ("online-no-discard", 0.0)):
        print(f"({'c' if lam else 'd'}) {name}, lambda_discard={lam}", flush=True)
        loss = LossConfig(ttt_steps=args.ttt_steps, lambda_discard=lam, tree_depth=spec.depth)
        drafts[name], curves[name], learn[name] = online(target, spec, loss, traffic, args)
        save_draft(out.parent / f"{out.stem}_drafts" / name, drafts[name])
    print("evaluating every arm, interleaved", flush=True)
    last_round = traffic[-args.round_requests:]
    results = evaluate(target, drafts, spec, eval_prompts, last_round, args.new_tokens,
                       args.repeats, args.eval_batch)

    ref = results["target-only"]
    for name, r in results.items():
        if r["outputs"] != ref["outputs"]:
            raise SystemExit(f"{name}: greedy outputs differ from target-only (a bug)")
    rows = [{"arm": name, "acceptance_length": round(r["acceptance_length"], 3),
             "traffic_acceptance_length": round(r["traffic_acceptance_length"], 3),
             "tokens_per_s": round(r["tokens_per_s"], 1),
             "vs_target_only": round(r["tokens_per_s"] / ref["tokens_per_s"], 3)}
            for name, r in results.items()]
    print("\n| arm | tau held-out | tau last traffic round | tok/s | vs target-only |\n"
          "|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['acceptance_length']:.2f} | "
              f"{row['traffic_acceptance_length']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{row['vs_target_only']:.2f}x |")
    for name, c in curves.items():
        print(f"{name}: served tau by round "
              + " ".join(f"{x['served_tau']:.2f}" for x in c))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "spec": dataclasses.asdict(spec), "rows": rows, "curves": curves,
        "learning": learn, "machine": {"platform": platform.platform(),
                                       "devices": [str(d) for d in jax.devices()]},
    }, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()

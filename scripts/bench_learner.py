"""What one online-learner step costs, and how much of it is the target's full-vocabulary head.

The learner trains the draft against the target's next-token distribution at every committed
position. Today it recomputes that distribution in the step: the target's final hidden state
times its lm_head (49,152 columns on SmolLM2), a softmax over the whole vocabulary, and the
renormalisation over the draft vocabulary, forward only (the target is frozen). The serving
step already computed those logits once. This script measures the step at the learner's
default shape (the stack's LearnerConfig: 8 sequences x 96 positions, TTT 3) and, on the same
batch, the target part alone, side by side, with each program's flops from XLA's cost
analysis. The batch is real: traces of --requests built-in prompts served by the stack.

    python scripts/bench_learner.py                       # SmolLM2, the stack's defaults
    python scripts/bench_learner.py --repeats 9 --out runs/bench_learner
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
import jax.numpy as jnp

from aurora_jax.builtin import resolve_target
from aurora_jax.data.scenarios import ScenarioConfig, build_scenario
from aurora_jax.engine.engine import Request
from aurora_jax.learn.divergence import draft_vocab_target
from aurora_jax.stack import StackConfig, build_stack


def _median_s(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (which blocks on its result), after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin")
    ap.add_argument("--requests", type=int, default=8, help="prompts served for the traces")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for bench_learner.json")
    args = ap.parse_args()

    path = resolve_target(args.target)
    cfg = StackConfig(target=str(path))
    stack = build_stack(cfg, path, max_slots=4, alternatives=False, learning="thread",
                        max_len=1024)
    tok, online = stack.tokenizer, stack.online
    assert tok is not None and online is not None
    chat = tok.chat_turn if tok.chat_template else None
    stream = build_scenario(ScenarioConfig(domains=("code", "prose"), requests=args.requests,
                                           max_new_tokens=args.new_tokens), tok.encode, chat)
    engine = stack.engine  # served here, not through Stack.run: no learner thread meanwhile
    engine.run([Request(r.prompt, args.new_tokens, id=i, domain=r.domain)
                for i, r in enumerate(stream)])
    assert engine.traces is not None
    engine.traces.flush()
    batch = online._batch()
    learner = online.learner
    draft = learner.draft
    head = learner.head

    def step() -> None:
        jax.block_until_ready(learner.step(batch))

    target_part = jax.jit(lambda h, hd, d2t, t2d: draft_vocab_target(
        (h @ hd).astype(jnp.float32), d2t, t2d))
    d2t, t2d = learner.buffers["d2t"][...], learner.buffers["t2d"][...]
    targs = (batch.target_hidden, head, d2t, t2d)
    compiled_target = target_part.lower(*targs).compile()
    step_s = _median_s(step, args.repeats)
    target_s = _median_s(lambda: jax.block_until_ready(compiled_target(*targs)), args.repeats)
    c = online.cfg
    row = {
        "batch": [c.batch_size, c.seq_len], "ttt_steps": learner.loss.ttt_steps,
        "vocab": int(head.shape[-1]), "draft_vocab": int(draft.cfg.draft_vocab_size),
        "step_s": step_s, "target_part_s": target_s, "target_share": target_s / step_s,
        "target_part_gflops": (_flops(compiled_target) or 0.0) / 1e9,
        "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
        "repeats": args.repeats, "config": dataclasses.asdict(cfg.learner),
    }
    print(f"learner step {c.batch_size}x{c.seq_len}, TTT {row['ttt_steps']}: "
          f"{1e3 * step_s:.0f} ms; the target's head + softmax + draft-vocab renormalisation "
          f"alone: {1e3 * target_s:.0f} ms ({100 * row['target_share']:.0f}% of the step, "
          f"{row['target_part_gflops']:.1f} GFLOP, vocab {row['vocab']})")
    stack.close()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_learner.json").write_text(json.dumps(row, indent=2))
        print(f"saved {out / 'bench_learner.json'}")


if __name__ == "__main__":
    main()

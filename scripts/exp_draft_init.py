"""Does a draft warm-started from the target's weights beat a random one, before training and
per learner step? (models/draft_init.py; issue 12, "a learner that keeps up".)

Arms differ only in the draft's initial weights: scratch (random), head (the target's lm_head
rows and final norm), full (head plus the target's top layer as the draft layer, fc passing
the highest aux layer). Each trains with the same optimizer on the same batches in the same
order: windows of the built-in corpus (the training split) with the target's features,
computed once and shared. Every --eval-every steps each arm is scored on fixed held-out
windows (held-out stdlib files and pydoc topics): the simulated greedy chain acceptance length
(1 + the run of correct draft steps, TTT depth) and the loss. Prints a table and writes JSON.

    python scripts/exp_draft_init.py --steps 150
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.builtin import resolve_target
from aurora_jax.data.corpus import held_out_documents, training_documents
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.data.vocab import scratch_draft_vocab
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER, Learner
from aurora_jax.learn.losses import LossConfig, draft_loss
from aurora_jax.learn.offline import feature_batch
from aurora_jax.models.draft_init import warm_start
from aurora_jax.models.loading import load_pair


def windows_of(docs, tok: Tokenizer, seq_len: int, n: int, rng) -> np.ndarray:
    stream = np.concatenate([np.asarray(tok.encode(d.text), np.int32) for d in docs])
    starts = rng.integers(0, len(stream) - seq_len, size=n)
    return np.stack([stream[s:s + seq_len] for s in starts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin")
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ttt-steps", type=int, default=3)
    ap.add_argument("--arms", default="scratch,head,full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results/draft_init.json")
    args = ap.parse_args()

    target_dir = resolve_target(args.target)
    tok = Tokenizer.load(target_dir)
    target, draft0 = load_pair(target_dir, "scratch", seed=args.seed,
                               draft_vocab=scratch_draft_vocab(args.draft_vocab_size, tok))
    rng = np.random.default_rng(args.seed)
    b, t = args.batch_size, args.seq_len
    train = windows_of(training_documents(4_000_000), tok, t, args.steps * b, rng)
    held = windows_of(held_out_documents(), tok, t, args.eval_batches * b, rng)
    feats = jax.jit(lambda state, tokens: feature_batch(dataclasses.replace(target, state=state),
                                                        tokens))
    t0 = time.perf_counter()
    train_batches = [jax.device_get(feats(target.state, train[i * b:(i + 1) * b]))
                     for i in range(args.steps)]
    eval_batches = [feats(target.state, held[i * b:(i + 1) * b]) for i in range(args.eval_batches)]
    print(f"target features for {args.steps} + {args.eval_batches} batches: "
          f"{time.perf_counter() - t0:.0f} s")

    loss = LossConfig(ttt_steps=args.ttt_steps, lambda_discard=0.0)
    opt = dataclasses.replace(DEFAULT_OPTIMIZER, learning_rate=args.lr)
    inits = {"scratch": lambda d: d, "head": lambda d: warm_start(d, target, layer=None),
             "full": lambda d: warm_start(d, target, layer=-1)}
    results = {}
    for arm in args.arms.split(","):
        learner = Learner(inits[arm](draft0), target, loss, opt)
        score = jax.jit(lambda p, batch, learner=learner: draft_loss(
            nnx.merge(learner.graphdef, p, learner.buffers), learner.embed,
            lambda h: (h @ learner.head).astype(jnp.float32), batch, loss)[1])
        curve, t_learn = [], 0.0
        for step in range(args.steps + 1):
            if step % args.eval_every == 0 or step == args.steps:
                ms = [jax.device_get(score(learner.state.params, e)) for e in eval_batches]
                row = {"step": step, "learn_s": t_learn,
                       "sim_acceptance": float(np.mean([m["sim_acceptance_length"]
                                                        for m in ms])),
                       "loss": float(np.mean([m["loss"] for m in ms]))}
                curve.append(row)
                print(f"{arm:8s} step {step:4d}  held-out sim tau {row['sim_acceptance']:.3f}  "
                      f"loss {row['loss']:.3f}  ({t_learn:.0f} s learning)", flush=True)
            if step == args.steps:
                break
            t1 = time.perf_counter()
            jax.block_until_ready(learner.step(train_batches[step]))
            t_learn += time.perf_counter() - t1
        results[arm] = curve
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "arms": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

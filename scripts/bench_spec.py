"""Speculative versus target-only decoding, measured side by side in one run.

For each batch size (concurrent slots), the same --num-prompts prompts go through engines
that differ only in their speculation setting: off (target-only), chain and tree with the
draft, and n-gram (prompt lookup, no draft) at each of --ngram-depths. Prompts (--prompts):
held-out standard-library files cut to the same token length (stdlib), the HumanEval prompts
(code), or chat turns that ask to explain a passage of Python's documentation (prose, under
the chat template). Each is
run once to compile, then --repeats times alternately, and the median is kept, so machine
noise hits all alike. Greedy decoding is lossless, so every setting generates the same tokens
(stop tokens end a request; --ignore-eos generates exactly --new-tokens). Reported per
setting: tokens/s, its ratio to target-only, acceptance length (tokens committed per
verification step, bonus included), target forwards per generated token, milliseconds per
engine step, and the break-even acceptance length (a speculative step's cost in target-only
steps: above it, speculation pays). Greedy outputs are checked equal across settings.

    python scripts/bench_spec.py                          # built-in target, scratch draft
    python scripts/bench_spec.py --draft runs/X/draft --prompts prose --transformers

A scratch (random) draft accepts almost nothing, so it measures the cost of speculating; the
wall-clock gain needs a trained draft (`--draft PATH`) or n-gram lookups that hit.
--transformers adds transformers' greedy `generate` on the same prompts (test extra).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax

from aurora_jax.accelerators.speed import compare_settings
from aurora_jax.builtin import resolve_target
from aurora_jax.data.prompts import stdlib_code_prompts
from aurora_jax.data.scenarios import CHAT_REQUEST, builtin_texts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.data.vocab import scratch_draft_vocab
from aurora_jax.models.loading import load_pair
from aurora_jax.speculative.config import SpecConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin",
                    help="builtin, builtin-tiny, a checkpoint directory or a .gguf file")
    ap.add_argument("--draft", default="scratch",
                    help="'scratch' (day-0 vocabulary of --draft-vocab-size), an EAGLE-3 "
                         "directory, or 'none' (no chain/tree rows)")
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--prompts", default="stdlib", choices=["stdlib", "code", "prose"])
    ap.add_argument("--ngram-depths", default="2,3,4",
                    help="n-gram settings to measure (comma-separated depths; '' for none)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="generate exactly --new-tokens per request")
    ap.add_argument("--transformers", action="store_true",
                    help="also time transformers' greedy generate on the same prompts")
    ap.add_argument("--batches", default="1,8", help="concurrent slots to measure")
    ap.add_argument("--num-prompts", type=int, default=8,
                    help="prompts served in each run (through the batch's slots)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--num-draft-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/spec.json")
    args = ap.parse_args()

    target_dir = resolve_target(args.target)
    tok = Tokenizer.load(target_dir)
    draft_arg = None if args.draft == "none" else args.draft
    target, draft = load_pair(target_dir, draft_arg, draft_vocab=scratch_draft_vocab(
        args.draft_vocab_size or None, tok) if draft_arg in ("scratch", "warm") else None)
    eos = () if args.ignore_eos else tok.stop_ids(target.cfg.eos_token_ids)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = bench_prompts(args.prompts, target_dir, tok, args.num_prompts, args.prompt_tokens)
    specs = {"off": SpecConfig(mode="off")}
    if draft is not None:
        specs["chain"] = SpecConfig(mode="chain", depth=args.depth)
        specs["tree"] = SpecConfig(mode="tree", depth=args.depth, topk=args.topk,
                                   num_draft_tokens=args.num_draft_tokens)
    for d in filter(None, args.ngram_depths.split(",")):
        specs[f"ngram{d}"] = SpecConfig(mode="ngram", depth=int(d))
    theirs = None
    if args.transformers:
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(target_dir).eval().float()
    rows = []
    for b in batches:
        rows += compare_settings(target, draft, specs, prompts, batch=b,
                                 new_tokens=args.new_tokens, repeats=args.repeats, eos_ids=eos)
        base = next(r["tokens_per_s"] for r in rows if r["batch"] == b and r["spec"] == "off")
        if theirs is not None:
            tps = _transformers_tokens_per_s(theirs, prompts, b, args.new_tokens, args.repeats)
            rows.append({"batch": b, "spec": "hf", "tokens_per_s": round(tps, 1),
                         "speedup_vs_target_only": round(tps / base, 3),
                         "acceptance_length": 1.0, "target_forwards_per_token": 1.0,
                         "engine_steps": None, "step_ms": None, "break_even_tau": None,
                         "compile_s": None})
    out = Path(args.out)
    meta = {"prompts": args.prompts, "ngram_depths": args.ngram_depths}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "target": str(target_dir), "draft": args.draft, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "depth": args.depth, "topk": args.topk,
        "num_draft_tokens": args.num_draft_tokens, "repeats": args.repeats,
        "jax": jax.__version__, "machine": platform.machine(), "devices": str(jax.devices()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta, "rows": rows}, indent=2))
    _print_table(rows)
    print(f"wrote {out}")


def _print_table(rows: list[dict]) -> None:
    def cell(x):
        return "-" if x is None else x

    print(f"{'batch':>5} {'spec':>7} {'tok/s':>8} {'vs off':>7} {'tau':>6} {'fwd/tok':>8} "
          f"{'step ms':>8} {'break-even tau':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['spec']:>7} {r['tokens_per_s']:>8} "
              f"{r['speedup_vs_target_only']:>7} {r['acceptance_length']:>6} "
              f"{r['target_forwards_per_token']:>8} {cell(r['step_ms']):>8} "
              f"{cell(r['break_even_tau']):>15}")


def bench_prompts(kind: str, target_dir, tok, n: int, length: int) -> list[list[int]]:
    """`n` prompts: stdlib files cut to `length` tokens, HumanEval prompts cut to `length`, or
    chat turns (a passage of `length` tokens to explain, under the chat template)."""
    if kind == "stdlib":
        return stdlib_code_prompts(target_dir, tok, n, length)
    if kind == "code":
        return [tok.encode(t)[:length] for t in builtin_texts("code")[:n]]
    passages = builtin_texts("prose")[:n]
    if not tok.chat_template:
        return [tok.encode(CHAT_REQUEST + t)[:length] for t in passages]
    return [tok.chat_turn(CHAT_REQUEST + t, length) for t in passages]


def _transformers_tokens_per_s(model, prompts, batch: int, new: int, repeats: int) -> float:
    """Greedy generate of exactly `new` tokens per prompt, `batch` prompts at a time
    (left-padded), median over repeats. (Stop tokens are ignored here, so its work is at least
    ours: a bound in its favour only where our requests stop early.)"""
    import torch

    def once() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    once()  # warm-up
    return len(prompts) * new / statistics.median(once() for _ in range(repeats))


if __name__ == "__main__":
    main()

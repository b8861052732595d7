"""Target-only greedy decoding throughput: aurora-jax versus transformers' `generate`.

Both run in this process on the same prompts (held-out standard-library files cut to the same
token length), at batch 1 and batch 8, generating exactly --new-tokens tokens (stop tokens
ignored on both sides, so the work is equal). Runs alternate between the two implementations
and the median is reported, so machine noise hits both alike. Compilation (ours) and the first
call (theirs) are excluded as warm-up. Needs the `test` extra (torch, transformers).

    python scripts/bench_target.py                       # the built-in target (SmolLM2-135M)
    python scripts/bench_target.py --model /path/to/checkpoint --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import torch
import transformers

from aurora_jax.builtin import resolve_target
from aurora_jax.data.prompts import stdlib_code_prompts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.models.hf_io import load_target


def time_ours(gen: TargetGenerator, batch: list[list[int]], new: int) -> tuple[float, list]:
    r = gen.generate(batch, new)
    assert all(len(c.token_ids) == new for c in r.completions)
    return r.decode_s, [c.token_ids for c in r.completions]


def time_theirs(model, batch: list[list[int]], new: int) -> tuple[float, list]:
    ids = torch.tensor(batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin",
                    help="builtin, builtin-tiny, or a Hugging Face checkpoint directory")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_results/bench_target.json")
    args = ap.parse_args()

    model_dir = resolve_target(args.model)
    tok = Tokenizer.load(model_dir)
    ours = TargetGenerator(load_target(model_dir), eos_ids=())  # never stop early
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval().float()
    batches = [int(b) for b in args.batches.split(",")]
    all_prompts = stdlib_code_prompts(model_dir, tok, max(batches), args.prompt_tokens)

    rows = []
    for b in batches:
        batch = all_prompts[:b]
        time_ours(ours, batch, args.new_tokens)  # compile
        time_theirs(theirs, batch, args.new_tokens)  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            dt, out_ours = time_ours(ours, batch, args.new_tokens)
            t_ours.append(dt)
            dt, out_theirs = time_theirs(theirs, batch, args.new_tokens)
            t_theirs.append(dt)
        tokens = b * args.new_tokens
        # min_new_tokens masks the stop token on their side only: compare up to our first one.
        eos = set(tok.eos_ids)
        agree = sum(a[: _until_stop(a, eos)] == c[: _until_stop(a, eos)]
                    for a, c in zip(out_ours, out_theirs, strict=True))
        row = {"batch": b, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
               "ours_tokens_per_s": tokens / statistics.median(t_ours),
               "transformers_tokens_per_s": tokens / statistics.median(t_theirs),
               "ours_runs_s": t_ours, "transformers_runs_s": t_theirs,
               "greedy_outputs_agree": f"{agree}/{b}"}
        row["speedup"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
        rows.append(row)

    print(f"\n{'batch':>5} {'aurora-jax tok/s':>17} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'greedy agree':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ours_tokens_per_s']:>17.1f} "
              f"{r['transformers_tokens_per_s']:>19.1f} {r['speedup']:>5.2f}x "
              f"{r['greedy_outputs_agree']:>12}")
    meta = {"model": str(model_dir), "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats, "statistic": "median"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


def _until_stop(ids: list[int], stop: set[int]) -> int:
    """Index of the first stop token (the length if there is none)."""
    return next((i for i, t in enumerate(ids) if t in stop), len(ids))


if __name__ == "__main__":
    main()

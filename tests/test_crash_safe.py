"""A server killed with SIGKILL mid-traffic and started again over the same workdir: what it
wrote is whole or absent (never a half shard read as whole), and the new server serves the
newest good draft in the workdir, losslessly, and writes shards that read back whole.

Where the kill lands is not left to chance: the first server runs with its trace store's
array writer wrapped (`trace_store._write_arrays`, the seam for making writes fail), so that
its second shard's arrays are written and its commit marker never is; the test kills the
server once that shard is half written, while requests are in flight."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from processes import child_env
from serving import PROMPTS
from spec_models import swap_state

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.models.loading import load_pair
from aurora_jax.store import kvstore
from aurora_jax.store.draft_store import DraftPublisher
from aurora_jax.store.trace_store import TraceStoreError, list_shards, read_shard

START_S = 600
"""Seconds a server may take to print where it serves: it compiles every program its traffic
will use first (tens of them, each tens of seconds on a loaded 2-core machine when the
compilation cache is cold)."""

HALF_SHARD = """
import sys, threading
from aurora_jax import cli
from aurora_jax.store import trace_store

write, shards = trace_store._write_arrays, []

def hang_before_the_second_commit(store, arrays):
    write(store, arrays)
    shards.append(next(iter(arrays)).split("/")[0])
    if len(shards) == 2:  # arrays written, the commit marker never: wait for the SIGKILL
        print("half-written", shards[-1], flush=True)
        threading.Event().wait()

trace_store._write_arrays = hang_before_the_second_commit
sys.exit(cli.main(sys.argv[1:]))
"""
"""`aurora-jax ...` with the trace store's second shard left half written."""


def _wait_for_line(proc: subprocess.Popen, log: Path, prefix: str, what: str,
                   limit_s: float) -> str:
    """The first line of `log` starting with `prefix`; fails saying `what` did not happen
    (and the log's tail) if the process exits or `limit_s` passes first."""
    deadline = time.monotonic() + limit_s
    while True:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None or time.monotonic() > deadline:
            status = (f"it exited with {proc.returncode}" if proc.returncode is not None
                      else f"not within {limit_s:.0f} s")
            proc.kill()
            pytest.fail(f"{what}: {status}; its log:\n" + log.read_text()[-3000:])
        time.sleep(0.2)


def _start(ckpt: Path, work: Path, log: Path, half_shard: bool = False
           ) -> tuple[subprocess.Popen, str]:
    env = child_env()
    program = ["-c", HALF_SHARD] if half_shard else ["-m", "aurora_jax.cli"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *program, "serve", f"target={ckpt}",
             "draft=scratch", "draft_vocab_size=null", "spec.mode=chain", "spec.depth=3",
             "learner.mode=workdir", f"learner.workdir={work}", "window_steps=null",
             "port=0", "max_len=96", "max_slots=2", "warmup_prompt_tokens=32",
             "model_name=tiny"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    line = _wait_for_line(proc, log, "serving ", "the server did not start", START_S)
    return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def _ask(url: str, prompt: str) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=120).json()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigkilled_server_leaves_whole_files_and_restarts_on_the_newest_draft(
        small_ckpt, tmp_path):
    work = tmp_path / "work"
    traces = work / "traces"
    target, draft = load_pair(small_ckpt, "scratch", draft_vocab=None)
    # A learner published two drafts before the server starts: it serves the newest.
    pub = DraftPublisher(work / "drafts", draft.state)
    pub.publish(swap_state(draft, seed=1))
    pub.publish(swap_state(draft, seed=2))
    pub.close()
    log = tmp_path / "serve1.log"
    proc, url = _start(small_ckpt, work, log, half_shard=True)
    try:
        first = _ask(url, PROMPTS[0])
        assert first["usage"]["draft_version"] == 2
        stop = threading.Event()

        def traffic():
            i = 0
            while not stop.is_set():
                try:
                    _ask(url, PROMPTS[i % len(PROMPTS)])
                except httpx.HTTPError:
                    return  # the server is gone
                i += 1

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        # Two shards of 8 sequences: seconds of traffic, on any machine.
        half = _wait_for_line(proc, log, "half-written ", "no second shard was written",
                              300).split()[1]
        proc.send_signal(signal.SIGKILL)  # mid-traffic, mid-shard
        proc.wait()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The kill left half a shard: its arrays, and no commit marker, so no reader sees it.
    assert kvstore.list_keys(kvstore.open_store(traces), f"{half}/"), \
        f"no array of the half-written shard {half} is on disk"
    shards = list_shards(traces)
    assert shards, "no shard was committed before the kill"
    assert half not in shards
    with pytest.raises(TraceStoreError):
        read_shard(traces, half)
    for shard in shards:  # every committed shard reads whole
        assert read_shard(traces, shard)
    proc, url = _start(small_ckpt, work, tmp_path / "serve2.log")
    try:
        tok = Tokenizer.load(small_ckpt)
        eos = tok.stop_ids(target.cfg.eos_token_ids)
        reference = TargetGenerator(target, eos_ids=eos)
        for p in PROMPTS[:3]:
            got = _ask(url, p)
            (want,) = reference.generate([tok.encode(p)], 16).completions
            assert got["choices"][0]["text"] == tok.decode(want.token_ids)
            assert got["usage"]["draft_version"] == 2
        status = httpx.get(url + "/admin/draft", timeout=10)
        assert status.status_code == 403  # no API key: the admin endpoint is closed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    assert json.loads((work / "engine.json").read_text())["tree_size"] == 4
    # The restarted server wrote its traces (flushed at SIGTERM) beside the old ones, whole.
    after = [s for s in list_shards(traces) if s not in shards]
    assert after, "the restarted server committed no shard"
    written = [seq for s in after for seq in read_shard(traces, s)]
    assert len(written) >= 3 and {seq.draft_version for seq in written} == {2}

"""A server killed with SIGKILL mid-traffic and started again over the same workdir: what it
wrote is whole or absent (never a half shard read as whole), and the new server serves the
newest good draft in the workdir, losslessly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import PROMPTS
from spec_models import swap_state

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.learn.draft_sync import DraftPublisher
from aurora_jax.learn.trace_store import list_shards, read_shard
from aurora_jax.models.loading import load_pair


def _start(ckpt: Path, work: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aurora_jax.cli", "serve", f"target={ckpt}",
             "draft=scratch", "draft_vocab_size=null", "spec.mode=chain", "spec.depth=3",
             "learning.mode=workdir", f"learning.workdir={work}", "window_steps=null",
             "port=0", "max_len=96", "model_name=tiny"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("serving "):
                return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not start:\n" + log.read_text()[-2000:])


def _ask(url: str, prompt: str) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=120).json()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigkilled_server_leaves_whole_files_and_restarts_on_the_newest_draft(
        small_ckpt, tmp_path):
    work = tmp_path / "work"
    target, draft = load_pair(small_ckpt, "scratch", draft_vocab=None)
    # A learner published two drafts before the server starts: it serves the newest.
    pub = DraftPublisher(work / "drafts", draft.state)
    pub.publish(swap_state(draft, seed=1))
    pub.publish(swap_state(draft, seed=2))
    pub.close()
    proc, url = _start(small_ckpt, work, tmp_path / "serve1.log")
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
        deadline = time.time() + 60
        while not list_shards(work / "traces") and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # mid-traffic, maybe mid-shard
        proc.wait()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    shards = list_shards(work / "traces")
    assert shards, "no shard was committed before the kill"
    for shard in shards:  # every committed shard reads whole
        assert read_shard(work / "traces", shard)
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
        assert status.status_code in (200, 403)  # no API key: the admin endpoint is closed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert json.loads((work / "engine.json").read_text())["tree_size"] == 4

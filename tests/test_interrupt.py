"""Ctrl-C: a long command stops on the first SIGINT, keeps what it finished, says what and
where in one line on stderr, and exits 130 without a traceback; a second SIGINT ends the
process at once. The commands run as real processes (`python -m aurora_jax.cli`) on the small
checkpoint, interrupted once they have finished some work."""

from __future__ import annotations

import gc
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import child_env

from aurora_jax import interrupt


class _Command:
    """An `aurora-jax` process with its stdout and stderr in files."""

    def __init__(self, args: list[str], tmp_path: Path):
        env = child_env()
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "aurora_jax.cli", *args],
                                         stdout=out, stderr=err, env=env)

    def wait_for(self, done, what: str, timeout_s: float = 300) -> None:
        deadline = time.time() + timeout_s
        while not done():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} (exit {self.proc.poll()}); stderr:\n"
                            + self.err.read_text()[-3000:])
            time.sleep(0.05)

    def interrupt(self) -> tuple[int, str]:
        """Sends one SIGINT; the exit status and the interrupt line (checked: the only one,
        and no traceback)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        err = self.err.read_text()
        assert "Traceback" not in err, err[-3000:]
        err = f"(exit {rc}) {err}"
        said = [line for line in err.splitlines() if "interrupted" in line]
        assert len(said) == 1 and said[0].startswith("aurora-jax: interrupted: "), err[-3000:]
        return rc, said[0]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_ctrl_c_stops_a_run_keeping_its_finished_windows(small_ckpt, tmp_path):
    # Far more requests than get served before the Ctrl-C lands. With its programs in the
    # compilation cache, a run of 40 in a loaded suite once served them all (its last 28 in
    # 2 s) before the signal came, and a finished run has nothing to interrupt.
    out = tmp_path / "run"
    cmd = _Command(["run", "--out", str(out), f"target={small_ckpt}", "scenario.requests=400",
                    "scenario.prompt_tokens=16", "scenario.max_new_tokens=8", "window=2",
                    "max_slots=2", "learner.steps_per_window=2", "learner.online.every_steps=2",
                    "learner.online.batch_size=2", "learner.online.seq_len=16",
                    "learner.online.trees_per_seq=2", "spec.depth=2", "spec.topk=2",
                    "spec.num_draft_tokens=4"], tmp_path)
    cmd.wait_for(lambda: _lines(out / "metrics.jsonl"), "finished window")
    rc, said = cmd.interrupt()
    assert rc == interrupt.EXIT_STATUS == 130
    windows = _lines(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    # The summary covers exactly the windows whose rows were written, and says it stopped.
    assert summary["interrupted"] is True and summary["final_window"] is None
    assert summary["windows"] == len(windows) >= 1
    assert summary["requests"] == windows[-1]["requests"] < 400
    assert summary["generated_tokens"] == sum(w["tokens"] for w in windows)
    assert said == (f"aurora-jax: interrupted: kept {len(windows)} finished "
                    f"window{'s' if len(windows) > 1 else ''} ({summary['requests']} of 400 "
                    f"requests) in {out}/ (generations.jsonl, metrics.jsonl, summary.json, "
                    "plots, draft/)")
    ids = {g["id"] for g in _lines(out / "generations.jsonl")}
    assert set(range(summary["requests"])) <= ids
    for name in ("acceptance.png", "throughput.png", "acceptance_by_domain.png",
                 "draft/config.json"):
        assert (out / name).stat().st_size > 0, name


def test_ctrl_c_stops_train_draft_between_steps_keeping_a_checkpoint(small_ckpt, tmp_path):
    import orbax.checkpoint as ocp

    from aurora_jax.data.corpus import held_out_code_files

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="replace") for p in held_out_code_files()[:2]))
    out = tmp_path / "draft-run"
    cmd = _Command(["train-draft", "--out", str(out), f"target={small_ckpt}", f"data={corpus}",
                    "batch_size=2", "seq_len=32", "draft_vocab_size=256", "ttt_steps=2",
                    "checkpoint_every=3", "steps=100000"], tmp_path)
    ckpts = out / "checkpoints"
    cmd.wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()),
                 "checkpoint")
    rc, said = cmd.interrupt()
    assert rc == 130
    got = re.fullmatch(r"aurora-jax: interrupted: kept the checkpoint of step (\d+) in (.+) "
                       r"\(training resumes from it\)", said)
    assert got and Path(got[2]) == ckpts, said
    mgr = ocp.CheckpointManager(ckpts.absolute())
    try:  # the step it stopped after, saved on the way out (not only the periodic ones)
        assert mgr.latest_step() == int(got[1]) >= 3
    finally:
        mgr.close()
    assert not (out / "draft").exists()


def test_ctrl_c_stops_serve_with_status_130(small_ckpt, tmp_path):
    cmd = _Command(["serve", f"target={small_ckpt}", "draft=none", "spec.mode=off",
                    "learner.mode=off", "port=0", "max_len=192", "warmup_prompt_tokens=16"],
                   tmp_path)
    cmd.wait_for(lambda: "serving " in cmd.out.read_text(), "server")
    rc, said = cmd.interrupt()
    assert rc == 130
    assert said == "aurora-jax: interrupted: answered 0 requests; nothing written"


CHILD = """
import sys, time
from aurora_jax import interrupt
with interrupt.handled(), interrupt.deferred():
    print("ready", flush=True)
    while not interrupt.requested():
        time.sleep(0.01)
    print("held", flush=True)
    time.sleep(60)  # a long step the first Ctrl-C waits for
"""


def test_a_second_ctrl_c_ends_the_process_at_once(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "ready" not in out.read_text() and time.time() < deadline:
            time.sleep(0.02)
        assert "ready" in out.read_text(), f"the child never got ready: {out.read_text()}"
        proc.send_signal(signal.SIGINT)  # held: the block has not ended
        while "held" not in out.read_text() and time.time() < deadline:
            time.sleep(0.02)
        assert "held" in out.read_text() and proc.poll() is None, out.read_text()
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        # Killed by the signal's default action: a shell reports 128 + 2 = 130.
        assert proc.wait(10) == -signal.SIGINT and time.time() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deferred_holds_a_ctrl_c_until_its_block_ends():
    before = signal.getsignal(signal.SIGINT)
    try:
        with interrupt.handled():
            with pytest.raises(interrupt.Interrupted) as got:
                with interrupt.deferred(kept="kept it all"):
                    with interrupt.deferred():  # nested: raised at the end of the outer one
                        signal.raise_signal(signal.SIGINT)
                        assert interrupt.requested()
                    assert interrupt.requested()
            assert got.value.kept == "kept it all" and not interrupt.requested()
        # After a Ctrl-C the default action stays: a second one would end this process.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        signal.signal(signal.SIGINT, before)
        with interrupt.handled(), pytest.raises(interrupt.Interrupted) as got:
            signal.raise_signal(signal.SIGINT)  # outside deferred(): raised at once
        assert got.value.kept == "" and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        signal.signal(signal.SIGINT, before)
        with interrupt.handled():  # no Ctrl-C: the previous handler comes back
            assert signal.getsignal(signal.SIGINT) is interrupt._on_sigint
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_lost_in_a_gc_callback_is_held_for_the_next_safe_point():
    """Python cannot raise out of a garbage-collector callback (jax registers one): the
    Interrupted raised there would be printed as "Exception ignored" and lost."""
    def collecting(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    try:
        with interrupt.handled():
            gc.callbacks.append(collecting)
            try:
                gc.collect()
            finally:
                gc.callbacks.remove(collecting)
            assert interrupt.requested()
            assert signal.getsignal(signal.SIGINT) is interrupt._on_sigint  # the next raises
            with pytest.raises(interrupt.Interrupted):
                interrupt.check()
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)

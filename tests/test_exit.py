"""A long command ends cleanly: `aurora-jax generate --online`, run as a real process until it
has learned and published drafts, exits 0 with none of its threads left running.

The bug this guards (issue 26): the engine hands a step's trace to its trace thread after the
step's finished requests were reported, and nothing closed that thread, so the command returned
while it was still turning the last step's device arrays into numpy (and the learner's last
steps were still running). The interpreter and JAX's runtime then tore down under it: SIGSEGV
(exit 139) after the summary line, in 3 of 4 runs on a 16M-parameter target. Whether a given
run crashes is a race; a trace thread still alive when the command returns is not, so the child
also reports the threads left once `main` returned.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from processes import child_env

# `python -m aurora_jax.cli` plus one line on stderr: the threads alive once `main` returned,
# which the interpreter's exit would otherwise meet running.
CHILD = """\
import json, sys, threading
from aurora_jax.cli import main
rc = main(sys.argv[1:])
left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
print("threads left: " + json.dumps(left), file=sys.stderr, flush=True)
sys.exit(rc)
"""

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def is_prime(n):\n    if n < 2:\n",
    "def read_lines(filename):\n    with open(filename) as f:\n",
    "def merge(a, b):\n    result = []\n",
    "def parse_args(argv):\n",
    "def mean(values):\n    total = 0\n",
]

# Threads the command does not own and that never touch a device: tqdm's progress-bar monitor
# sleeps on an event until the interpreter exits.
HARMLESS = {"TMonitor", "tqdm_monitor"}


def test_generate_online_exits_0_after_publishing_drafts(small_ckpt, tmp_path: Path):
    """Eight requests, two at a time. A request's sequence reaches the learner's buffer
    after its result, so the first four fill the buffer, the learner steps after the next
    two results publish drafts (every 2 steps), and the last two requests are served by a
    published draft. The process must exit 0 with no thread of its own still running."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = child_env()
    env.pop("PYTHONFAULTHANDLER", None)  # (it changes how a crash at exit shows)
    args = ["generate", "--target", str(small_ckpt), "--online", "--draft", "scratch",
            "--spec", "chain", "--prompts", str(prompts), "--max-slots", "2",
            "--max-new-tokens", "12", "--temperature", "0", "--sync-every", "2",
            "--learn-per-request", "2", "--json"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True,
                          text=True, env=env, timeout=600)
    said = f"exit {proc.returncode} after {time.monotonic() - t0:.0f} s; stderr:\n" \
           + proc.stderr[-3000:]
    assert proc.returncode == 0, said
    assert "Traceback" not in proc.stderr, said

    published = re.search(r"drafts published (\d+)\]", proc.stderr)
    assert published is not None and int(published.group(1)) >= 1, said
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(results) == len(PROMPTS), proc.stdout
    assert results[-1]["draft_version"] >= 1, results[-1]  # served by a published draft

    left = re.search(r"threads left: (.*)", proc.stderr)
    assert left is not None, said
    assert set(json.loads(left.group(1))) <= HARMLESS, said


def test_an_emitter_dropped_without_close_frees_its_consumer_and_ends_its_thread():
    """An engine dropped unclosed must not live on through its trace thread: the worker
    holds its emitter weakly, so the emitter (and whatever its consumer holds: an engine,
    its compiled programs) is freed, and the worker ends within a few seconds. Closed, an
    emitter delivers every trace first."""
    import gc
    import threading
    import time
    import weakref

    from aurora_jax.engine.trace import TraceEmitter

    class Holder:  # what a consumer holds in real use (an online learner holds its engine)
        def __init__(self):
            self.got = []
            self.emitter = TraceEmitter(self.take)

        def take(self, trace):
            self.got.append(trace)

    kept = Holder()
    kept.emitter.submit("a")
    kept.emitter.close()
    assert kept.got == ["a"] and not kept.emitter._thread.is_alive()

    dropped = Holder()
    dropped.emitter.submit("b")
    dropped.emitter.flush()
    thread, alive = dropped.emitter._thread, weakref.ref(dropped)
    del dropped
    gc.collect()
    assert alive() is None, "the worker thread kept its emitter's consumer alive"
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not thread.is_alive(), "the worker of a dropped emitter never ended"
    assert thread not in threading.enumerate()

"""Multi-host serving: `aurora-jax generate` across two processes equals one device.

Two local processes, 4 CPU devices each, join one JAX job through the environment
(aurora_jax/distributed.py; collectives through gloo, the coordinator on a free localhost
port) and serve the same prompts file on the global 1 x 8 ("dp", "tp") mesh: the test
checkpoint's q/k/v, MLP and vocabulary dimensions really split over 8 devices (its 2 KV heads
stay replicated). Greedy outputs, target-only and speculative (a tree from a warm day-0
draft, saved as an EAGLE-3 directory), must equal the single-device outputs token for token;
only process 0 prints them. (Two prompts on two slots keep the compiled programs, the bulk of
the test's time on two cores, to three per setting.) `aurora-jax serve` the same way: process
0 answers HTTP, both take the same steps (serve/lockstep.py), and greedy completions equal
target-only decoding on one device.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aurora_jax.cli import main

# Each process serves both settings, one `main` after the other (the second joins the job the
# first started: initialize is a no-op once the runtime is up).
CHILD = textwrap.dedent("""
    import json, sys
    from aurora_jax.cli import main
    for argv in json.loads(sys.argv[1]):
        print("=== run", flush=True)
        assert main(argv) == 0, argv
    import jax
    print(f"=== done: process {jax.process_index()} of {jax.process_count()}, "
          f"{len(jax.devices())} devices", flush=True)
""")

PROMPTS = ["def fibonacci(n):\n    ", "class Config:\n    def"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _runs(stdout: str) -> list[dict]:
    """{id: token_ids} per `main` call, from the JSON lines a process printed."""
    runs: list[dict] = []
    for line in stdout.splitlines():
        if line.startswith("=== run"):
            runs.append({})
        elif line.startswith("{"):
            row = json.loads(line)
            runs[-1][row["id"]] = row
    return runs


def _start(child: str, *args: str) -> list[subprocess.Popen]:
    """Two processes running `child` with `args`, joined into one JAX job of 2 x 4 CPU
    devices through the environment (the coordinator on a free localhost port)."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   AURORA_JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   AURORA_JAX_NUM_PROCESSES="2", AURORA_JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", child, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _launch(argvs: list[list[str]], timeout_s: float) -> list[subprocess.CompletedProcess]:
    procs = _start(CHILD, json.dumps(argvs))
    deadline, done = time.monotonic() + timeout_s, []
    try:
        for p in procs:  # a process whose peer died waits in a collective: never hang the suite
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _warm_draft(ckpt, out):
    """A warm day-0 draft (the target's head and top layer) saved as an EAGLE-3 directory."""
    from aurora_jax.models.eagle3_io import save_draft
    from aurora_jax.models.loading import load_pair

    _, draft = load_pair(ckpt, "warm")
    return save_draft(out, draft)


def test_two_processes_serve_like_one_device(chat_ckpt, tmp_path, capsys):
    draft = _warm_draft(chat_ckpt, tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    base = ["generate", "--target", str(chat_ckpt), "--prompts", str(prompts), "--json",
            "--max-new-tokens", "10", "--max-slots", "2"]
    argvs = [base + ["--spec", "off"],
             base + ["--draft", str(draft), "--spec", "tree", "--depth", "3", "--topk", "2",
                     "--num-draft-tokens", "6"]]
    procs = _launch(argvs, timeout_s=300)

    # The single-device reference, in this process (one device, no distributed runtime).
    alone = []
    for argv in argvs:
        assert main(argv) == 0
        alone.append(_runs("=== run\n" + capsys.readouterr().out)[0])
    assert len(alone[0]) == len(PROMPTS)

    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{p.stdout}\n{p.stderr[-4000:]}"
        assert f"process {i} of 2, 8 devices" in p.stdout
    primary, secondary = (_runs(p.stdout) for p in procs)
    assert secondary == [{}, {}], "only process 0 prints results"
    for together, single in zip(primary, alone, strict=True):
        assert {k: r["token_ids"] for k, r in together.items()} == \
               {k: r["token_ids"] for k, r in single.items()}
    # The speculative run really speculated across the mesh: drafted tokens were accepted,
    # and the same number of them as on one device.
    spec, spec_alone = primary[1], alone[1]
    assert max(r["acceptance_length"] for r in spec.values()) > 1.0
    assert {k: r["target_forwards"] for k, r in spec.items()} == \
           {k: r["target_forwards"] for k, r in spec_alone.items()}


SERVE_CHILD = "import sys\nfrom aurora_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _lines(stream) -> queue.Queue:
    """The lines of a pipe, read on a thread as they come (None at its end)."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=read, daemon=True).start()
    return q


def _rest(lines: queue.Queue) -> str:
    """What is left of a pipe read by `_lines`, up to its end."""
    out = []
    while (line := lines.get(timeout=30)) is not None:
        out.append(line)
    return "".join(out)


def _served_url(lines: queue.Queue, deadline: float) -> str:
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if m := re.search(r"on (http://\S+)/v1", line):
            return m.group(1)
    raise AssertionError(f"process 0 never said where it serves: {seen}")


def test_two_processes_serve_http_like_one_device(chat_ckpt, tmp_path):
    """Process 0 answers three concurrent requests (two slots: one waits; one ends at a stop
    string) while process 1 takes the same steps; greedy texts equal target-only decoding on
    one device. A draft published to the workdir (as an `aurora-jax learn` process would) is
    swapped in by both processes; process 0 alone writes the traces. SIGTERM to process 0
    stops both."""
    openai = pytest.importorskip("openai")
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.engine.target_only import TargetGenerator
    from aurora_jax.learn.draft_sync import DraftPublisher
    from aurora_jax.learn.trace_store import list_shards, read_shard
    from aurora_jax.models.draft_init import warm_start
    from aurora_jax.models.loading import load_pair
    from aurora_jax.serve.loadgen import scrape

    # A warm day-0 draft, made in each process from the target split across both of them.
    work = tmp_path / "work"
    procs = _start(SERVE_CHILD, "serve", f"target={chat_ckpt}", "draft=warm",
                   "draft_vocab_size=null",
                   "spec.mode=tree", "spec.depth=3", "spec.topk=2", "spec.num_draft_tokens=6",
                   "window_steps=null", "learning.mode=workdir", f"learning.workdir={work}",
                   "max_slots=2", "max_len=192", "port=0", "model_name=tiny")
    pipes = [(_lines(p.stdout), _lines(p.stderr)) for p in procs]  # never let a pipe fill up
    try:
        # The reference meanwhile, in this process: target-only greedy on one device; and the
        # draft to publish later: another warm start (the head only).
        tokenizer = Tokenizer.load(chat_ckpt)
        target, scratch = load_pair(chat_ckpt, "scratch", draft_vocab=None)
        published = warm_start(scratch, target, layer=None).state
        reference = TargetGenerator(target, eos_ids=tokenizer.stop_ids(target.cfg.eos_token_ids))
        want = [tokenizer.decode(c.token_ids) for c in reference.generate(
            [tokenizer.encode(p) for p in PROMPTS], 12).completions]
        stop = next(want[0][i:i + 2] for i in range(2, len(want[0]) - 2)
                    if want[0][i:i + 2].strip())
        asks = [(PROMPTS[0], None), (PROMPTS[1], None), (PROMPTS[0], [stop])]
        expected = [want[0], want[1], want[0][:want[0].find(stop)]]

        url = _served_url(pipes[0][0], time.monotonic() + 300)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(lambda a: c.completions.create(
                model="tiny", prompt=a[0], max_tokens=12, temperature=0, stop=a[1]), asks))
        assert [g.choices[0].text for g in got] == expected
        assert got[2].choices[0].finish_reason == "stop"
        assert max(g.usage.model_extra["acceptance_length"] for g in got) > 1.0
        assert {g.usage.model_extra["draft_version"] for g in got} == {0}

        assert DraftPublisher(work / "drafts", None).publish(published) == 1
        deadline = time.monotonic() + 60
        while scrape(url).get("aurora_jax:draft_version") != 1:
            assert time.monotonic() < deadline, "the published draft was never swapped in"
            time.sleep(0.2)
        after = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12,
                                     temperature=0)
        assert after.choices[0].text == want[1]
        assert after.usage.model_extra["draft_version"] == 1
    finally:
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:  # a process whose peer died waits in a collective: never hang the suite
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outs = [(_rest(out), _rest(err)) for out, err in pipes]
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{out}\n{err[-4000:]}"
    # Only process 0 serves HTTP and speaks (gloo's own connection lines, printed from several
    # threads at once and sometimes interleaved, are all that process 1 writes to stdout).
    assert "serving" not in outs[1][0] and "http" not in outs[1][0]
    assert "answered" not in outs[1][1]
    assert "answered 4 requests" in outs[0][1]
    assert "serving draft version 1" in outs[1][1]  # process 1 swapped it in too
    traces = str(work / "traces")
    seqs = [q for n in list_shards(traces) for q in read_shard(traces, n)
            if str(q.request_id).startswith("cmpl-")]
    assert sorted(q.draft_version for q in seqs) == [0, 0, 0, 1]


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     ("h:1", 4, 3, False)),
    ({"AURORA_JAX_COORDINATOR_ADDRESS": "a:2", "JAX_COORDINATOR_ADDRESS": "h:1",
      "AURORA_JAX_PROCESS_ID": "1"}, ("a:2", None, 1, False)),
    ({"AURORA_JAX_DISTRIBUTED": "auto"}, (None, None, None, True)),
])
def test_distributed_config_from_environment(environ, expected):
    """Null config fields come from the environment (ours first, then JAX's names); with
    nothing set anywhere, no job is joined."""
    from aurora_jax.distributed import DistributedConfig

    cfg = DistributedConfig().with_env(environ)
    if expected is None:
        assert not cfg.enabled
        return
    assert cfg.enabled
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.auto) == expected
    # A field the config sets wins over the environment.
    assert DistributedConfig(process_id=0).with_env(environ).process_id == 0


def test_bad_distributed_settings_are_refused():
    from aurora_jax.distributed import DistributedConfig, initialize
    from aurora_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="below num_processes"):
        DistributedConfig(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="must be an integer"):
        DistributedConfig().with_env({"AURORA_JAX_PROCESS_ID": "first"})
    # Nothing configured: a single process never touches jax.distributed.
    assert initialize(DistributedConfig(), environ={}) is False


def test_multiprocess_run_refuses_what_would_differ_between_processes():
    """Timing-driven mode choices, the learner, and a target on fewer than all devices would
    make the processes take different steps; a multi-process run refuses them up front."""
    import jax

    from aurora_jax.cli import _check_multiprocess_run
    from aurora_jax.engine.adaptive import AdaptiveConfig
    from aurora_jax.errors import ConfigError
    from aurora_jax.run.config import LearnSettings, RunConfig

    same = dict(adaptive=AdaptiveConfig(enabled=False), learner=LearnSettings(enabled=False),
                tp=jax.device_count())
    _check_multiprocess_run(RunConfig(**same), compare=False)
    for change, message in [({"adaptive": AdaptiveConfig()}, "adaptive.enabled=false"),
                            ({"learner": LearnSettings()}, "learner.enabled=false"),
                            ({"tp": jax.device_count() + 1}, "splits the target over all")]:
        with pytest.raises(ConfigError, match=message):
            _check_multiprocess_run(RunConfig(**{**same, **change}), compare=False)
    with pytest.raises(ConfigError, match="--compare"):
        _check_multiprocess_run(RunConfig(**same), compare=True)


def test_multiprocess_serve_refuses_what_would_differ_between_processes():
    """Adaptive windows timed on each process's clock, a draft swapped in by a learner, and a
    target on fewer than all devices are refused up front."""
    import jax

    from aurora_jax.cli import _check_multiprocess_serve
    from aurora_jax.errors import ConfigError
    from aurora_jax.serve.config import ServeConfig, ServeLearning

    same = dict(window_steps=None, learning=ServeLearning(mode="off"))
    _check_multiprocess_serve(ServeConfig(**same))
    _check_multiprocess_serve(ServeConfig(window_steps=None,
                                          learning=ServeLearning(mode="workdir", workdir="w")))
    _check_multiprocess_serve(ServeConfig(**same, tp=jax.device_count()))
    for change, message in [({"window_steps": 32}, "window_steps=null"),
                            ({"learning": ServeLearning(mode="thread")}, "learning.mode=workdir"),
                            ({"tp": jax.device_count() + 1}, "splits the target over all")]:
        with pytest.raises(ConfigError, match=message):
            _check_multiprocess_serve(ServeConfig(**{**same, **change}))

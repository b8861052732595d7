"""Multi-host serving: `aurora-jax generate` and `serve` across two processes equal one device.

One launch of two local processes, 4 CPU devices each, joined into one JAX job through the
environment (aurora_jax/distributed.py; collectives through gloo, the coordinator on a free
localhost port). Each process runs `generate` on the same prompts file, target-only and then
speculative (a tree from a warm day-0 draft, saved as an EAGLE-3 directory), then `serve`, all
on the global 1 x 8 ("dp", "tp") mesh: the test checkpoint's q/k/v, MLP and vocabulary
dimensions really split over 8 devices (its 2 KV heads stay replicated in the cache), and each
process says so for every target it loads. Greedy outputs must equal the single-device
outputs token for token; only process 0 prints them. (Two prompts on two slots keep the
compiled programs, the bulk of the test's time on two cores, to three per setting.) Serving,
process 0 answers HTTP, both take the same steps (serve/lockstep.py), and greedy completions
equal target-only decoding on one device. The single-device references are computed in the
test's own process while the two compile.
"""

from __future__ import annotations

import json
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
from processes import child_env

from aurora_jax.cli import main

# Each process runs the `generate` argvs (json, argv[1]) one after the other, then `serve`
# (argv[2:]); a later `main` joins the job the first started (initialize is a no-op once the
# runtime is up). Every target a command loads reports into how many shards its embedding and
# one attention weight are cut: 8 on the 8-device mesh, 1 if it were replicated.
CHILD = textwrap.dedent("""
    import json, math, os, sys
    import jax

    # For the suite's speed alone: JAX writes its persistent cache from process 0 only, and
    # on CPU each process's cache key holds its own view of the topology, so process 1 would
    # compile every program on every run. Here it writes (and later reads) its own entries.
    from jax._src import compilation_cache, compiler
    if (os.environ["AURORA_JAX_PROCESS_ID"] != "0" and hasattr(compiler, "_cache_write")
            and hasattr(compilation_cache, "put_executable_and_time")):
        def _write_own(key, compile_s, name, backend, executable, host_callbacks):
            if not host_callbacks:
                compilation_cache.put_executable_and_time(key, name, executable, backend,
                                                          int(compile_s))
        compiler._cache_write = _write_own
    from aurora_jax.models import loading
    from aurora_jax.models.sharding import state_path

    def shards(x):
        return math.prod(x.shape) // math.prod(x.sharding.shard_shape(x.shape))

    def load_pair(*args, _load=loading.load_pair, **kwargs):
        target, draft = _load(*args, **kwargs)
        leaves = jax.tree_util.tree_flatten_with_path(target.state)[0]
        w = {state_path(k): x for k, x in leaves}
        print(f"=== split: embed {shards(w['embed',])}, "
              f"q_proj {shards(w['layers', '0', 'attn', 'q_proj', 'kernel'])}", flush=True)
        return target, draft

    loading.load_pair = load_pair  # before any command imports it
    from aurora_jax.cli import main
    for argv in json.loads(sys.argv[1]):
        print("=== run", flush=True)
        assert main(argv) == 0, argv
    print(f"=== done: process {jax.process_index()} of {jax.process_count()}, "
          f"{len(jax.devices())} devices", flush=True)
    for stream in (sys.stdout, sys.stderr):
        print("=== serve", file=stream, flush=True)
    sys.exit(main(sys.argv[2:]))
""")

PROMPTS = ["def fibonacci(n):\n    ", "class Config:\n    def"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _runs(stdout: str) -> list[dict]:
    """{id: row} per `main` call, from the JSON lines a process printed."""
    runs: list[dict] = []
    for line in stdout.splitlines():
        if line.startswith("=== run"):
            runs.append({})
        elif line.startswith("{"):
            row = json.loads(line)
            runs[-1][row["id"]] = row
    return runs


class _Lines:
    """A pipe's lines, read on a thread as they come (so that it never fills up) and kept: a
    test waits for a line while the process runs, and reads them all once it has ended."""

    def __init__(self, pipe):
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match | None:
        """The first line that matches `pattern`; None once the pipe ends or `timeout_s` runs
        out without one."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    return None
                self._changed.wait(left)

    def text(self, timeout_s: float = 60) -> str:
        """Everything the pipe carried, once it has ended."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._ended, timeout_s):
                raise AssertionError(f"a pipe stayed open {timeout_s} s after its process ended")
            return "".join(self._lines)

    def so_far(self) -> str:
        with self._changed:
            return "".join(self._lines)


class _Job:
    """Two processes running `child` with `args`, joined into one JAX job of 2 x 4 CPU devices
    through the environment (the coordinator on a free localhost port); their stdout and
    stderr read as they come."""

    def __init__(self, child: str, *args: str):
        port = _free_port()
        self.procs = []
        for i in range(2):
            env = child_env(devices=4,
                            AURORA_JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                            AURORA_JAX_NUM_PROCESSES="2", AURORA_JAX_PROCESS_ID=str(i))
            self.procs.append(subprocess.Popen([sys.executable, "-c", child, *args], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True))
        self.out = [_Lines(p.stdout) for p in self.procs]
        self.err = [_Lines(p.stderr) for p in self.procs]

    def expect(self, i: int, pattern: str, timeout_s: float, what: str) -> re.Match:
        """The first line of process `i`'s stdout matching `pattern`; fails saying `what` did
        not happen (and what both processes printed) if it ends or times out first."""
        if m := self.out[i].wait_for(pattern, timeout_s):
            return m
        raise AssertionError(f"{what} (waited up to {timeout_s:.0f} s):\n" + "\n".join(
            f"--- process {j} (exit {p.poll()}) stdout:\n{self.out[j].so_far()[-4000:]}\n"
            f"--- stderr:\n{self.err[j].so_far()[-4000:]}" for j, p in enumerate(self.procs)))

    def stop(self, timeout_s: float = 180) -> None:
        """SIGTERM to process 0, which ends the job; a process still running after
        `timeout_s` (one whose peer died waits in a collective) is killed: never hang the
        suite."""
        self.procs[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> _Job:
        return self

    def __exit__(self, *exc) -> None:
        """Kills what still runs (after a failed check, say): a process whose peer is gone
        would wait in a collective."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def results(self) -> list[tuple[int, str, str]]:
        """(exit status, stdout, stderr) of each process, once stopped."""
        return [(p.returncode, out.text(), err.text())
                for p, out, err in zip(self.procs, self.out, self.err, strict=True)]


def _warm_draft(ckpt, out):
    """A warm day-0 draft (the target's head and top layer) saved as an EAGLE-3 directory."""
    from aurora_jax.models.eagle3_io import save_draft
    from aurora_jax.models.loading import load_pair

    _, draft = load_pair(ckpt, "warm")
    return save_draft(out, draft)


def test_two_processes_generate_and_serve_like_one_device(chat_ckpt, tmp_path, capsys):
    """`generate` (target-only, then a tree) equals one device token for token, with as many
    target forwards. Then `serve`: process 0 answers three concurrent requests (two slots:
    one waits; one ends at a stop string) while process 1 takes the same steps; greedy texts
    equal target-only decoding on one device. A draft published to the workdir (as an
    `aurora-jax learn` process would) is swapped in by both processes; process 0 alone writes
    the traces. SIGTERM to process 0 stops both. Every target either loads is split 8 ways."""
    openai = pytest.importorskip("openai")
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.engine.target_only import TargetGenerator
    from aurora_jax.models.draft_init import warm_start
    from aurora_jax.models.loading import load_pair
    from aurora_jax.serve.loadgen import scrape
    from aurora_jax.store.draft_store import DraftPublisher
    from aurora_jax.store.trace_store import list_shards, read_shard

    draft = _warm_draft(chat_ckpt, tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    base = ["generate", "--target", str(chat_ckpt), "--prompts", str(prompts), "--json",
            "--max-new-tokens", "10", "--max-slots", "2"]
    argvs = [base + ["--spec", "off"],
             base + ["--draft", str(draft), "--spec", "tree", "--depth", "3", "--topk", "2",
                     "--num-draft-tokens", "6"]]
    # Serving: a warm day-0 draft, made in each process from the target split across both.
    # Warm-up builds the programs of prompts up to 16 tokens (these prompts' bucket) only: with
    # an empty cache both processes compile every program.
    work = tmp_path / "work"
    serve = ["serve", f"target={chat_ckpt}", "draft=warm", "draft_vocab_size=null",
             "spec.mode=tree", "spec.depth=3", "spec.topk=2", "spec.num_draft_tokens=6",
             "window_steps=null", "learner.mode=workdir", f"learner.workdir={work}",
             "max_slots=2", "max_len=192", "warmup_prompt_tokens=16", "port=0",
             "model_name=tiny"]
    with _Job(CHILD, json.dumps(argvs), *serve) as job:
        # The references meanwhile, in this process (one device, no distributed runtime):
        # both `generate` runs; target-only greedy for the server; and the draft to publish
        # later, another warm start (the head only).
        alone = []
        for argv in argvs:
            assert main(argv) == 0
            alone.append(_runs("=== run\n" + capsys.readouterr().out)[0])
        assert len(alone[0]) == len(PROMPTS)
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

        # Waits are generous: two processes compiling on a loaded two-core machine.
        url = job.expect(0, r"on (http://\S+)/v1", 900,
                         "process 0 never said where it serves").group(1)
        job.expect(1, r"^=== serve", 300, "process 1 never finished its generate runs")
        _check_generate(job, alone)

        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(lambda a: c.completions.create(
                model="tiny", prompt=a[0], max_tokens=12, temperature=0, stop=a[1]), asks))
        assert [g.choices[0].text for g in got] == expected
        assert got[2].choices[0].finish_reason == "stop"
        assert max(g.usage.model_extra["acceptance_length"] for g in got) > 1.0
        assert {g.usage.model_extra["draft_version"] for g in got} == {0}

        assert DraftPublisher(work / "drafts", None).publish(published) == 1
        deadline = time.monotonic() + 300
        while scrape(url).get("aurora_jax:draft_version") != 1:
            assert time.monotonic() < deadline, "the published draft was never swapped in"
            time.sleep(0.2)
        after = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12,
                                     temperature=0)
        assert after.choices[0].text == want[1]
        assert after.usage.model_extra["draft_version"] == 1
        job.stop()
    results = job.results()
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"process {i}:\n{out}\n{err[-4000:]}"
    # Only process 0 serves HTTP and speaks (gloo's own connection lines, printed from several
    # threads at once and sometimes interleaved, are all that process 1 writes to stdout).
    (_, err0), (out1, err1) = ((_after_serve(out), _after_serve(err)) for _, out, err in results)
    assert "serving" not in out1 and "http" not in out1
    assert "answered" not in err1
    assert "answered 4 requests" in err0
    assert "serving draft version 1" in err1  # process 1 swapped it in too
    traces = str(work / "traces")
    seqs = [q for n in list_shards(traces) for q in read_shard(traces, n)
            if str(q.request_id).startswith("cmpl-")]
    assert sorted(q.draft_version for q in seqs) == [0, 0, 0, 1]
    for i, (_, out, _) in enumerate(results):
        _check_split(_after_serve(out), loads=1, process=i)


_SERVE = re.compile(r"^=== serve\n", re.M)


def _after_serve(text: str) -> str:
    """What a process printed once its `generate` runs were done and `serve` began."""
    return _SERVE.split(text, 1)[1]


def _check_split(text: str, loads: int, process: int) -> None:
    """Each of the `loads` targets a process loaded was split over all 8 devices: its
    embedding by vocabulary, q_proj by heads (a replicated target reports 1 and 1)."""
    splits = re.findall(r"^=== split: (.*)$", text, re.M)
    assert splits == ["embed 8, q_proj 8"] * loads, f"process {process}: {splits}"


def _check_generate(job: _Job, alone: list[dict]) -> None:
    """Both processes' `generate` runs (printed before "=== serve") against `alone`."""
    head = [_SERVE.split(out.so_far(), 1)[0] for out in job.out]
    for i, text in enumerate(head):
        assert f"process {i} of 2, 8 devices" in text
        _check_split(text, loads=2, process=i)
    primary, secondary = (_runs(text) for text in head)
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

    from aurora_jax.engine.adaptive import AdaptiveConfig
    from aurora_jax.errors import ConfigError
    from aurora_jax.run.config import RunConfig, RunLearner

    same = dict(adaptive=AdaptiveConfig(enabled=False), learner=RunLearner(enabled=False),
                tp=jax.device_count())
    RunConfig(**same).check_multiprocess(False, jax.device_count())
    for change, message in [({"adaptive": AdaptiveConfig()}, "adaptive.enabled=false"),
                            ({"learner": RunLearner()}, "learner.enabled=false"),
                            ({"tp": jax.device_count() + 1}, "splits the target over all")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(**{**same, **change}).check_multiprocess(False, jax.device_count())
    with pytest.raises(ConfigError, match="--compare"):
        RunConfig(**same).check_multiprocess(True, jax.device_count())


def test_multiprocess_serve_refuses_what_would_differ_between_processes():
    """Adaptive windows timed on each process's clock, a draft swapped in by a learner, and a
    target on fewer than all devices are refused up front."""
    import jax

    from aurora_jax.errors import ConfigError
    from aurora_jax.serve.config import ServeConfig, ServeLearner

    same = dict(window_steps=None, learner=ServeLearner(mode="off"))
    ServeConfig(**same).check_multiprocess(jax.device_count())
    ServeConfig(window_steps=None, learner=ServeLearner(mode="workdir", workdir="w")
                ).check_multiprocess(jax.device_count())
    ServeConfig(**same, tp=jax.device_count()).check_multiprocess(jax.device_count())
    for change, message in [({"window_steps": 32}, "window_steps=null"),
                            ({"learner": ServeLearner(mode="thread")}, "learner.mode=workdir"),
                            ({"tp": jax.device_count() + 1}, "splits the target over all")]:
        with pytest.raises(ConfigError, match=message):
            ServeConfig(**{**same, **change}).check_multiprocess(jax.device_count())

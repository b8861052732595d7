"""`aurora-jax serve` end to end: a real server on 127.0.0.1, driven by the official `openai`
client (and httpx where a client must misbehave). Outputs are checked against target-only
greedy decoding token for token; metrics against the responses' usage."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from processes import child_env
from serving import KEY, PROMPTS

from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.serve.config import ServeConfig, ServeLearner
from aurora_jax.serve.loadgen import scrape
from aurora_jax.serve.text import TextStream
from aurora_jax.speculative.config import SpecConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(shared_server):
    """(server, base url, reference decoder): the session's shared server (a scratch draft
    speculating in tree mode, no learning, so outputs and metrics are deterministic;
    serving.shared_config) and target-only greedy decoding to hold it to."""
    server, url = shared_server
    return server, url, TargetGenerator(server.target, eos_ids=server.engine.eos_ids)


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def reference_text(server, reference, prompt_ids: list[int], max_tokens: int):
    (c,) = reference.generate([prompt_ids], max_tokens).completions
    return server.tokenizer.decode(c.token_ids), c




def test_greedy_completions_equal_target_only_streamed_and_not(served):
    server, url, reference = served
    c = client(url)
    for prompt in PROMPTS[:3]:
        want, ref = reference_text(server, reference, server.tokenizer.encode(prompt), 24)
        got = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want
        assert got.choices[0].finish_reason == ref.finish_reason
        assert got.usage.completion_tokens == len(ref.token_ids)
        assert got.usage.prompt_tokens == len(server.tokenizer.encode(prompt))
        extra = got.usage.model_extra
        assert extra["target_forwards"] >= 1 and extra["acceptance_length"] >= 1.0
        assert extra["draft_version"] == 0
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
            ref.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_uses_the_chat_template(served):
    server, url, reference = served
    messages = [{"role": "user", "content": "write a loop"}]
    ids = server.tokenizer.encode_chat(messages)
    assert server.tokenizer.decode(ids).startswith("<user>write a loop")
    want, _ = reference_text(server, reference, ids, 16)
    got = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                              temperature=0)
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    stream = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want


def test_a_seed_makes_a_sampled_completion_repeatable(served):
    _, url, _ = served
    c = client(url)

    def ask(seed):
        return c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16,
                                    temperature=1.5, seed=seed).choices[0].text

    first = ask(11)
    assert ask(11) == first
    assert len({first, ask(12), ask(13), ask(14)}) > 1


def test_sixteen_concurrent_requests_all_complete_correctly(served):
    server, url, reference = served
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    c = client(url)

    def ask(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    for p, g in zip(prompts, got, strict=True):
        want, _ = reference_text(server, reference, server.tokenizer.encode(p), 20)
        assert g.choices[0].text == want


def test_stop_strings_that_span_tokens_are_honoured(served):
    server, url, reference = served
    prompt = PROMPTS[0]
    ids = server.tokenizer.encode(prompt)
    _, ref = reference_text(server, reference, ids, 40)
    pieces = [server.tokenizer.decode(ref.token_ids[:k]) for k in range(len(ref.token_ids) + 1)]
    full = pieces[-1]
    # A stop string from the middle of token k's text into token k+1's: it spans a boundary.
    k = next(k for k in range(3, len(pieces) - 2)
             if len(pieces[k]) - len(pieces[k - 1]) >= 2 and len(pieces[k + 1]) > len(pieces[k]))
    start = len(pieces[k]) - 1
    stop = full[start:len(pieces[k]) + 1]
    assert full.find(stop) == start  # its first occurrence
    for stream in (False, True):
        got = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                             temperature=0, stop=[stop, "\x00never"],
                                             stream=stream)
        if stream:
            chunks = [ch for ch in got if ch.choices]
            text = "".join(ch.choices[0].text for ch in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = got.choices[0].text, got.choices[0].finish_reason
        assert text == full[:start] and reason == "stop"


def test_text_stream_holds_back_a_possible_stop_string():
    """Unit: a stop string split across two updates is never partly sent."""
    pieces = ["ab", "abc", "abcXY", "abcXYZ"]
    s = TextStream(lambda ids: pieces[len(ids) - 1], ("cXYZ",))
    sent = [s.update([0] * n, final=False) for n in range(1, 5)]
    assert "".join(sent) == "ab" and s.stopped


def _metrics(url: str) -> dict[str, float]:
    return scrape(url, KEY)


def test_metrics_parse_and_match_the_usage(served):
    server, url, _ = served
    before = _metrics(url)
    c = client(url)
    usages = [c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).usage
              for p in PROMPTS[3:6]]
    after = _metrics(url)
    # Compile work is reported: every program the engine built, warm-up included.
    assert after["aurora_jax:compiled_programs{mode=spec}"] == server.engine.compilations >= 2
    assert after["aurora_jax:compile_seconds{mode=spec}"] == \
        pytest.approx(server.engine.compile_s, rel=1e-6)
    assert server.engine.compile_s > 0

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("aurora_jax:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("aurora_jax:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("aurora_jax:request_success_total{finished_reason=length}") + \
        delta("aurora_jax:request_success_total{finished_reason=stop}") == 3
    steps = sum(u.model_extra["target_forwards"] - 1 for u in usages)
    accepted = sum(round((u.model_extra["acceptance_length"] - 1) *
                         (u.model_extra["target_forwards"] - 1)) for u in usages)
    assert delta("aurora_jax:spec_decode_num_drafts_total") == steps
    assert delta("aurora_jax:spec_decode_num_accepted_tokens_total") == accepted
    assert delta("aurora_jax:spec_decode_num_draft_tokens_total") == steps * 3
    per_pos = sum(delta(f"aurora_jax:spec_decode_num_accepted_tokens_per_pos_total"
                        f"{{position={p}}}") for p in range(3))
    assert per_pos == accepted
    assert delta("aurora_jax:e2e_request_latency_seconds_count") == 3
    assert after["aurora_jax:num_requests_running"] == 0


def test_a_cancelled_stream_frees_its_slot(served, monkeypatch):
    server, url, _ = served
    real = server.engine.generate

    def slow(state):  # decoding slower than the client hangs up, on any machine
        time.sleep(0.05)
        return real(state)

    monkeypatch.setattr(server.engine, "generate", slow)
    before = _metrics(url)
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 150, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then the client goes away
    deadline = time.time() + 120  # the server notices a hang-up within 0.5 s when idle
    while time.time() < deadline:
        m = _metrics(url)
        aborted = m.get("aurora_jax:request_success_total{finished_reason=abort}", 0) - \
            before.get("aurora_jax:request_success_total{finished_reason=abort}", 0)
        if aborted == 1 and m["aurora_jax:num_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert aborted == 1 and m["aurora_jax:num_requests_running"] == 0, \
        f"the hung-up stream was not ended 'abort' in 120 s: {aborted} aborted, " \
        f"{m['aurora_jax:num_requests_running']} running"
    assert all(i is None for i in server.loop.batchers["spec"].slot_request)


def test_a_hot_swap_during_traffic_stays_lossless_and_raises_the_version(served, tmp_path,
                                                                        monkeypatch):
    """Four greedy streams run on the four slots; once each has sent its first chunk,
    /admin/draft swaps in another draft. At least one of them was in flight across the swap
    (it began before the swap and its usage names the new version), every text equals
    target-only's, the next request is served by the new version, and nothing compiled.
    (Decoding holds still from the first chunks until /admin/draft has answered, however long
    loading the draft takes, then runs at 50 ms a step, so that 40-token streams outlast the
    swap's landing: a swap lands within one step.)"""
    from aurora_jax.models.eagle3 import DraftConfig, init_draft
    from aurora_jax.models.eagle3_io import save_draft

    server, url, reference = served
    other = init_draft(DraftConfig.for_target(server.target.cfg), seed=7)
    save_draft(tmp_path / "draft", other)
    before = _metrics(url)
    version = before["aurora_jax:draft_version"]
    compiled, compile_s = server.engine.compilations, server.engine.compile_s
    real = server.engine.generate

    all_started, swapped = threading.Event(), threading.Event()

    def slow(state):
        if all_started.is_set():
            swapped.wait(120)
        time.sleep(0.05)
        return real(state)

    monkeypatch.setattr(server.engine, "generate", slow)
    prompts, max_tokens = PROMPTS[:4], 40
    chunks: dict[int, list[dict]] = {i: [] for i in range(len(prompts))}
    started = {i: threading.Event() for i in chunks}

    def stream(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks[i].append(json.loads(line[6:]))
                    started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in chunks]
    for t in threads:
        t.start()
    for i, ev in started.items():
        assert ev.wait(120), f"stream {i} sent no first chunk"
    all_started.set()
    try:
        r = httpx.post(url + "/admin/draft", json={"path": str(tmp_path / "draft")},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    finally:
        swapped.set()
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a stream never ended"
    monkeypatch.setattr(server.engine, "generate", real)
    across = []
    for i, p in enumerate(prompts):
        want, _ = reference_text(server, reference, server.tokenizer.encode(p), max_tokens)
        assert "".join(c["choices"][0]["text"] for c in chunks[i] if c["choices"]) == want
        if chunks[i][-1]["usage"]["draft_version"] == version + 1:
            across.append(i)  # it began with the old draft (its first chunk came before)
    assert across, "no request was in flight across the swap"
    after = client(url).completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=30,
                                           temperature=0)
    assert after.usage.model_extra["draft_version"] == version + 1
    m = _metrics(url)
    assert m["aurora_jax:draft_version"] == version + 1 == r.json()["version"]
    assert m["aurora_jax:draft_hot_swaps_total"] >= 1
    status = httpx.get(url + "/admin/draft", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert status["serving_version"] == version + 1
    # A swap replaces an argument of the compiled step: nothing was compiled for it.
    assert (server.engine.compilations, server.engine.compile_s) == (compiled, compile_s)
    assert m["aurora_jax:compiled_programs{mode=spec}"] == \
        before["aurora_jax:compiled_programs{mode=spec}"]


BAD = [
    (b'{"model": "tiny", "prompt": "x"', 400, None),  # malformed JSON
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": math.nan}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x " * 400, "max_tokens": 8}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "seed": -4}, 400, "seed"),
    ({"model": "tiny", "prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": 7}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "stop": ["a"] * 100}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_bodies_get_openai_errors_and_the_server_stays_up(served, body, status, param):
    _, url, _ = served
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/completions", content=raw, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_the_api_key_is_required_everywhere_but_health(served):
    _, url, _ = served
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_a_full_queue_answers_429_at_once(served):
    from aurora_jax.engine.batcher import Request
    from aurora_jax.serve.app import RETRY_AFTER_S
    from aurora_jax.serve.loop import ServerBusy, Ticket

    server, url, _ = served
    loop = server.loop
    saved = loop.max_queue
    loop.max_queue = -server.engine.max_slots  # nothing more fits
    try:
        ticket = Ticket(Request([1, 2], 2), TextStream(str), None, None)  # type: ignore[arg-type]
        with pytest.raises(ServerBusy):
            loop.submit(ticket)
        # Through HTTP: OpenAI's error object, and when to try again.
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                 "stream": stream},
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "full" in err["message"]
            assert r.headers["retry-after"] == str(RETRY_AFTER_S)
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        loop.max_queue = saved
    assert loop._pending == 0  # the refused requests hold no admission count


def test_admin_draft_needs_a_configured_key_and_the_right_one(served, tmp_path, monkeypatch):
    """With a key, a wrong or missing key is 401 and nothing is swapped; a server with no
    key configured refuses /admin/draft outright (403), whatever the request carries."""
    import types

    from fastapi.testclient import TestClient

    from aurora_jax.serve.app import create_app
    from aurora_jax.serve.config import ServeConfig

    server, url, _ = served
    version = server.engine.draft_version
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        r = httpx.post(url + "/admin/draft", json={"path": str(tmp_path)}, headers=headers,
                       timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/admin/draft", headers=headers).status_code == 401
    assert server.engine.draft_version == version

    monkeypatch.delenv("AURORA_JAX_API_KEY", raising=False)
    loads: list[str] = []
    keyless = types.SimpleNamespace(cfg=ServeConfig(api_key=None), load_draft=loads.append,
                                    draft_status=dict)
    with TestClient(create_app(keyless)) as c:  # type: ignore[arg-type]
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = c.post("/admin/draft", json={"path": str(tmp_path)}, headers=headers)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["type"] == "permission_error"
            assert c.get("/admin/draft", headers=headers).status_code == 403
    assert loads == []


GRACE_S = 0.5


def test_sigterm_answers_in_flight_requests_and_exits_cleanly(chat_ckpt, tmp_path):
    """SIGTERM while two streams run: the one that can finish within --grace finishes
    ("length"), the one that cannot ends "abort" when the grace runs out, both streams end
    with [DONE], a new request is refused, and the server exits 0 saying it stopped.

    The race and why its margins hold on a loaded 2-core machine: the short request needs 4
    more steps against a grace of 0.5 s (over 10x four steps of this tiny tree engine even
    under load); the long one asks for all the room its prompt leaves in 512 slots, over 400
    tokens, each step a scratch-draft tree step of at least 3 ms on an idle machine with a
    warm compilation cache (so well over 1 s), and a loaded machine slows both alike. (With
    300 tokens, a 1 s grace and 320 slots, a quiet machine with a warm cache finished the
    long one inside the grace.) Neither
    depends on when the signal lands: both streams have their first chunk before it is sent."""
    port_file = tmp_path / "out.txt"
    env = child_env()
    with open(port_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aurora_jax.cli", "serve", "--grace", str(GRACE_S),
             f"target={chat_ckpt}", "draft=scratch", "draft_vocab_size=null",
             "spec.mode=tree", "spec.depth=3", "spec.topk=2", "spec.num_draft_tokens=6",
             "window_steps=null", "learner.mode=off", "port=0", "max_len=512",
             "default_max_tokens=512",
             "warmup_prompt_tokens=16", "model_name=tiny"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        url = None
        while url is None and time.time() < deadline and proc.poll() is None:
            for line in port_file.read_text().splitlines():
                if line.startswith("serving "):
                    url = line.split(" on ")[1].split()[0].removesuffix("/v1")
            time.sleep(0.1)
        assert url, f"the server never said where it serves:\n{port_file.read_text()[-2000:]}"
        streams = {"short": 6, "long": None}  # None: all the room the prompt leaves
        chunks: dict[str, list[str]] = {name: [] for name in streams}
        started = {name: threading.Event() for name in streams}

        def stream(name):
            body = {"model": "tiny", "prompt": PROMPTS[0], "temperature": 0, "stream": True}
            if streams[name] is not None:
                body["max_tokens"] = streams[name]
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks[name].append(line)
                        started[name].set()

        threads = {name: threading.Thread(target=stream, args=(name,)) for name in streams}
        for name in ("long", "short"):
            threads[name].start()
            assert started[name].wait(120), f"the {name} stream sent no first chunk"
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        refused = None
        while refused is None and time.time() < t0 + 30:
            try:  # once the listening socket is closed: no connection; until then a 503
                r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                              "max_tokens": 2}, timeout=30)
            except httpx.TransportError:
                refused = "no connection"
            else:
                assert r.status_code == 503, f"a request after SIGTERM was served: {r.text}"
                refused = "503"
        assert refused, "a request after SIGTERM was neither refused nor answered 503"
        for name, t in threads.items():
            t.join(60)
            assert not t.is_alive(), f"the {name} stream never ended"
        assert proc.wait(60) == 0, port_file.read_text()[-2000:]
        for name in streams:
            assert chunks[name] and chunks[name][-1] == "data: [DONE]", (name, chunks[name][-3:])
        reasons = {name: json.loads(chunks[name][-2][6:])["choices"][0]["finish_reason"]
                   for name in streams}
        assert reasons["short"] in ("length", "stop") and reasons["long"] == "abort", reasons
        texts = {name: "".join(json.loads(c[6:])["choices"][0]["text"]
                               for c in chunks[name][:-1]) for name in streams}
        assert texts["long"] and texts["short"], texts
        assert "serve: stopped" in port_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_configs_of_before_the_stack_keys_still_load_with_a_warning(caplog):
    """serve's `learning` is now the stack's `learner`, learn's top-level online / optimizer /
    loss are `learner.*`: old files and overrides load to the same config, each old key named
    in a warning with its new name; a setting given both ways is refused."""
    from aurora_jax.config_io import load_config
    from aurora_jax.errors import ConfigError
    from aurora_jax.learn_job import LearnJobConfig

    with caplog.at_level("WARNING"):
        old = load_config(ServeConfig, None, ["learning.mode=off", "learning.schedule=always"])
    assert old == load_config(ServeConfig, None, ["learner.mode=off",
                                                  "learner.schedule=always"])
    assert old.learner.mode == "off" and old.learner.schedule == "always"
    assert "'learning' is deprecated; use 'learner'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        old = load_config(LearnJobConfig, None, ["online.every_steps=3", "loss.ttt_steps=2",
                                                 "learner.optimizer.learning_rate=0.01"])
    assert (old.learner.online.every_steps, old.learner.loss.ttt_steps,
            old.learner.optimizer.learning_rate) == (3, 2, 0.01)
    assert "'online' is deprecated; use 'learner.online'" in caplog.text
    with pytest.raises(ConfigError, match="both set"):
        load_config(ServeConfig, None, ["learning.mode=off", "learner.mode=thread"])


def test_serve_config_refuses_bad_settings():
    from aurora_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="learner"):
        ServeConfig(draft="none", spec=SpecConfig(mode="off"))
    with pytest.raises(ConfigError, match="workdir"):
        ServeLearner(mode="workdir")
    with pytest.raises(ConfigError, match="port"):
        ServeConfig(port=70000)
    from aurora_jax.config_io import load_config

    # YAML 1.1 reads a bare `off` as false: a Literal field with "off" takes it back.
    cfg = load_config(ServeConfig, None, ["draft=none", "spec.mode=off", "learner.mode=off"])
    assert (cfg.spec.mode, cfg.learner.mode) == ("off", "off")
    root = Path(__file__).parents[1]
    assert load_config(ServeConfig, root / "configs" / "serve.yaml") == ServeConfig()


def test_load_generator_measures_what_the_server_served(served):
    import asyncio

    from aurora_jax.serve.loadgen import drive, summarize

    server, url, reference = served
    rows = asyncio.run(drive(url, "tiny", PROMPTS[:4], rate=20.0, max_tokens=12, api_key=KEY))
    s = summarize(rows)
    want = [len(reference.generate([server.tokenizer.encode(p)], 12).completions[0].token_ids)
            for p in PROMPTS[:4]]
    assert [r["tokens"] for r in rows] == want and s["tokens"] == sum(want)
    assert s["requests"] == 4 and s["tokens_per_s"] > 0
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["e2e_p50_s"] <= s["e2e_p99_s"]
    assert all(r["ttft_s"] <= r["e2e_s"] for r in rows)
    steps = [r["target_forwards"] - 1 for r in rows]
    tau = sum(r["acceptance_length"] * n for r, n in zip(rows, steps, strict=True)) / sum(steps)
    assert s["acceptance_length"] == pytest.approx(tau)


def test_the_draft_learns_while_serving_and_swaps_stay_lossless(chat_ckpt):
    """learning.mode thread: the learner trains on the served traffic and publishes; each
    publication is a hot swap the metrics count, and outputs stay target-only's."""
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.serve.server import Server, serving_in_thread

    cfg = ServeConfig(target=str(chat_ckpt), draft="scratch", draft_vocab_size=None,
                      spec=SpecConfig(mode="chain", depth=3), max_slots=2, max_len=160,
                      port=0, model_name="tiny", window_steps=None, warmup_prompt_tokens=16,
                      learner=ServeLearner(mode="thread", online=OnlineConfig(
                          batch_size=2, seq_len=16, trees_per_seq=2, min_sequences=2,
                          every_steps=2)))
    server = Server(cfg, chat_ckpt)
    with serving_in_thread(server) as url:
        reference = TargetGenerator(server.target, eos_ids=server.engine.eos_ids)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        deadline, versions = time.time() + 600, set()  # (about 20 s on an idle machine)
        while time.time() < deadline:
            for p in PROMPTS:
                got = c.completions.create(model="tiny", prompt=p, max_tokens=24,
                                           temperature=0)
                want, _ = reference_text(server, reference, server.tokenizer.encode(p), 24)
                assert got.choices[0].text == want
                versions.add(got.usage.model_extra["draft_version"])
            if max(versions) >= 2:
                break
        m = scrape(url)
        assert max(versions) >= 2, f"no request was served by a learned draft's second " \
            f"version in 600 s (versions served: {sorted(versions)}; learner steps " \
            f"{m.get('aurora_jax:learner_steps')})"
        assert m["aurora_jax:draft_version"] >= 2
        assert m["aurora_jax:draft_hot_swaps_total"] >= 1
        assert m["aurora_jax:learner_steps"] >= 4
        assert m["aurora_jax:draft_hot_swap_latency_seconds_count"] >= 1




def test_the_adaptive_policy_switches_engines_losslessly_and_decides_from_what_it_measured(
        chat_ckpt):
    """Windows of a few steps each choose among the chain draft, prompt lookup and the target
    alone: every engine serves, every output is target-only's, at most max_slots requests
    run over all engines at once, and each window's mode is exactly what the utility
    monitor chooses when fed, in order, what the earlier windows measured."""
    from aurora_jax.engine.adaptive import AdaptiveConfig, UtilityMonitor
    from aurora_jax.serve.server import Server, serving_in_thread

    adaptive = AdaptiveConfig(probe_every=2, alternatives=(SpecConfig(mode="ngram", depth=3),))
    cfg = ServeConfig(target=str(chat_ckpt), draft="scratch", draft_vocab_size=None,
                      spec=SpecConfig(mode="chain", depth=3), adaptive=adaptive, window_steps=4,
                      max_slots=3, max_len=160, port=0, model_name="tiny", warmup_prompt_tokens=16,
                      learner=ServeLearner(mode="off"))
    server = Server(cfg, chat_ckpt)
    loop = server.loop
    assert list(server.engines) == ["spec", "alt1", "off"]
    held, admit = [], loop._admit

    def admit_and_count():
        admit()
        held.append(sum(len(b.queue) + sum(i is not None for i in b.slot_request)
                        for b in loop.batchers.values()))

    loop._admit = admit_and_count
    with serving_in_thread(server) as url:
        reference = TargetGenerator(server.target, eos_ids=server.engine.eos_ids)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        want = {p: reference_text(server, reference, server.tokenizer.encode(p), 20)[0]
                for p in PROMPTS}

        def ask(p):
            return c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0)

        usages = []
        for _ in range(3):  # concurrent rounds (hand-overs mid-flight) and a sequential one
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(ask, PROMPTS))
            got += [ask(p) for p in PROMPTS[:2]]
            for p, g in zip(PROMPTS + PROMPTS[:2], got, strict=True):
                assert g.choices[0].text == want[p]
            usages += [g.usage.model_extra for g in got]
        m = scrape(url)
    served = {u["speculation"] for u in usages}
    assert served == {"chain 3", "ngram 3", "off"}
    assert all(u["draft_version"] is None for u in usages if u["speculation"] != "chain 3")
    assert all(u["acceptance_length"] == 1.0 for u in usages if u["speculation"] == "off")
    assert max(held) <= 3
    # The speculative counters count the speculative engines' steps only.
    assert m["aurora_jax:spec_decode_num_drafts_total"] == sum(
        u["target_forwards"] - 1 for u in usages if u["speculation"] != "off")
    # Replay: the same choices from the same measurements.
    windows = list(loop.policy.history)
    assert len(windows) >= 6 and {w.mode for w in windows} == {"spec", "alt1", "off"}
    assert sum(m[f"aurora_jax:adaptive_windows_total{{mode={x}}}"] for x in server.engines) \
        == len(windows)
    monitor = UtilityMonitor(adaptive, modes=("spec", "alt1", "off"))
    for w in windows:
        assert monitor.choose(w.load) == w.mode
        if w.timed >= loop.policy.min_steps:
            monitor.record(w.mode, w.tokens, w.seconds, w.load)
    assert all(w.steps == 4 and w.timed <= w.steps for w in windows)
    timed = [w for w in windows if w.timed >= loop.policy.min_steps]
    assert timed and all(w.tokens > 0 and w.seconds > 0 for w in timed)
    shown = [x for x in server.engines
             if m[f"aurora_jax:spec_mode_info{{mode={x},setting="
                  f"{server.engines[x].spec.label}}}"] == 1.0]
    assert shown == [loop.policy.last_mode]

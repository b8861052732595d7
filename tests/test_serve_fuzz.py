"""Fuzzed requests (issue 16): hypothesis draws request bodies for the OpenAI-compatible
server and sends them as raw bytes. Bodies: a wrong type, a huge, negative or non-finite
number (NaN and Infinity as raw JSON tokens) in every field; odd Unicode (lone surrogates,
right-to-left and zero-width marks, NUL); empty prompts and prompts over max_len tokens or
over max_body_bytes bytes; thousands of stop strings; nesting thousands of levels deep;
prompts as token ids; chat messages of the wrong shape; unknown fields; streamed or not;
bytes that are not JSON at all; and every endpoint under every method.

The property: every answer is OpenAI's error object with a 4xx status (naming the field at
fault where the test knows it), or a 200 completion of the right shape whose greedy text is
target-only decoding's, never a 5xx; and the server stays healthy: after every example
/health answers ok, the serving loop runs without an error, and no answered request still
holds a slot or an admission count.

Hypothesis runs a fixed number of examples per test, derandomized (the same bodies on every
run), and does not shrink: a failure can leave the shared server broken, so that later
examples would fail for the wrong reason; the first failing example is the one to read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from serving import KEY, MAX_BODY, MAX_LEN, MAX_TOKENS, MODEL

from aurora_jax.engine.target_only import TargetGenerator

if TYPE_CHECKING:
    from aurora_jax.serve.server import Server

AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
               "rate_limit_error"}

FUZZ = settings(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


# ---- the server ---------------------------------------------------------------------------


@dataclasses.dataclass
class Fuzzed:
    server: Server
    http: httpx.Client
    reference: Reference
    ckpt: Path


SHORT_QUEUE = 2
"""The shared server's admission queue while this module runs: a burst gets 429s."""


@pytest.fixture(scope="module")
def fuzzed(shared_server, chat_ckpt):
    """The session's shared server (a scratch draft speculating in tree mode, an API key so
    that /admin/draft serves, no learning; serving.shared_config) with a short queue while
    this module runs, so that a burst gets 429s; an httpx client that sends the key; the
    target-only reference."""
    server, url = shared_server
    saved, server.loop.max_queue = server.loop.max_queue, SHORT_QUEUE
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            yield Fuzzed(server, http, Reference(server), chat_ckpt)
    finally:
        server.loop.max_queue = saved


class Reference:
    """Target-only greedy decoding of MAX_TOKENS tokens per prompt (cached): what a greedy
    request for up to MAX_TOKENS tokens must be answered."""

    def __init__(self, server):
        self.decode = server.tokenizer.decode
        self.generator = TargetGenerator(server.target, eos_ids=server.engine.eos_ids)
        self.done: dict[tuple[int, ...], tuple[list[int], str]] = {}

    def tokens(self, prompt_ids: list[int]) -> tuple[list[int], str]:
        """The first MAX_TOKENS greedy tokens (fewer when a stop token ends them) and why
        they end."""
        key = tuple(prompt_ids)
        if key not in self.done:
            (c,) = self.generator.generate([list(prompt_ids)], MAX_TOKENS).completions
            self.done[key] = (c.token_ids, c.finish_reason)
        return self.done[key]

    def answer(self, prompt_ids: list[int], max_tokens: int,
               stops: tuple[str, ...]) -> tuple[str, str, int | None]:
        """(text, finish_reason, completion tokens; None when a stop string cut the text and
        speculation may have gone past it)."""
        assert max_tokens <= MAX_TOKENS
        tokens, reason = self.tokens(prompt_ids)
        if len(tokens) > max_tokens:
            tokens, reason = tokens[:max_tokens], "length"
        text = self.decode(tokens)
        cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if cuts:
            return text[:min(cuts)], "stop", None
        return text, reason, len(tokens)


# ---- what an answer must look like --------------------------------------------------------


def check_error(r: httpx.Response, status: int | None = None, param: object = ...,
                code: object = ...) -> dict:
    """OpenAI's error object with a 4xx status (and the given status, param and code)."""
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:1000]}"
    if status is not None:
        assert r.status_code == status, r.text[:1000]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    payload = r.json()
    assert list(payload) == ["error"], payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] in ERROR_TYPES, err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def read_answer(r: httpx.Response, chat: bool, stream: bool,
                include_usage: bool) -> tuple[str, str, dict | None]:
    """(text, finish_reason, usage) of a 200 answer, its shape checked on the way: one
    completion object, or server-sent chunks ending with [DONE] (a usage chunk before it when
    asked for)."""
    assert r.status_code == 200, f"{r.status_code}: {r.text[:1000]}"
    if not stream:
        body = r.json()
        check_envelope(body, chat, "chat.completion" if chat else "text_completion")
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        if chat:
            assert choice["message"]["role"] == "assistant"
            text = choice["message"]["content"]
        else:
            text = choice["text"]
        assert isinstance(text, str)
        return text, choice["finish_reason"], check_usage(body["usage"])
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    *events, done, tail = r.text.split("\n\n")
    assert done == "data: [DONE]" and tail == "", r.text[-300:]
    assert all(e.startswith("data: ") for e in events), events
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    usage = None
    if include_usage:
        last = chunks.pop()
        check_envelope(last, chat, "chat.completion.chunk" if chat else "text_completion")
        assert last["choices"] == []
        usage = check_usage(last["usage"])
    assert chunks, r.text
    pieces, reasons = [], []
    for i, chunk in enumerate(chunks):
        check_envelope(chunk, chat, "chat.completion.chunk" if chat else "text_completion")
        (choice,) = chunk["choices"]
        assert choice["index"] == 0
        reasons.append(choice["finish_reason"])
        if chat:
            delta = choice["delta"]
            assert set(delta) <= {"role", "content"}
            assert (delta.get("role") == "assistant") == (i == 0), chunks
            pieces.append(delta.get("content", ""))
        else:
            pieces.append(choice["text"])
    assert all(x is None for x in reasons[:-1]) and reasons[-1] is not None, reasons
    return "".join(pieces), reasons[-1], usage


def check_envelope(body: dict, chat: bool, kind: str) -> None:
    assert body["object"] == kind and body["model"] == MODEL, body
    assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert isinstance(body["created"], int)


def check_usage(usage: dict) -> dict:
    counts = [usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    assert all(type(n) is int and n >= 0 for n in counts), usage
    assert counts[0] + counts[1] == counts[2], usage
    assert usage["target_forwards"] >= 1 and usage["speculation"] == "tree 3/2/6", usage
    return usage


def check_served(fz: Fuzzed, chat: bool, body: dict, r: httpx.Response,
                 busy_ok: bool = False) -> None:
    """A body the API accepts: served right, or refused for its length only (and with
    `busy_ok`, for a full server)."""
    tokenizer = fz.server.tokenizer
    prompt = body.get("prompt")
    ids = (tokenizer.encode_chat(body["messages"]) if chat
           else tokenizer.encode(prompt[0] if isinstance(prompt, list) else prompt))
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    asked = next((body[k] for k in keys if body.get(k) is not None), None)
    room = MAX_LEN - len(ids)
    max_tokens = asked or min(MAX_TOKENS, room)
    if room < 1 or max_tokens > room:
        note("refused: over max_len")
        check_error(r, 400, "max_tokens" if room >= 1 and asked else "prompt",
                    "context_length_exceeded")
        return
    if busy_ok and r.status_code == 429:
        note("refused: server full")
        check_error(r, 429, code=None)
        return
    stream = body.get("stream", False)
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    text, reason, usage = read_answer(r, chat, stream, include_usage and stream)
    assert reason in ("stop", "length"), reason
    note(f"served: {'streamed' if stream else 'one object'}")
    if usage is not None:
        assert usage["prompt_tokens"] == len(ids), usage
        assert 1 <= usage["completion_tokens"] <= max_tokens, usage
        assert reason == "stop" or usage["completion_tokens"] == max_tokens, usage
    stops = stop_strings(body.get("stop"))
    assert not any(s in text for s in stops), (text, stops)
    if body.get("temperature") == 0 and max_tokens <= MAX_TOKENS:  # greedy: target-only's
        note("served: greedy, equal to target-only" + (", cut at a stop string" if reason ==
              "stop" and stops else ""))
        want, want_reason, want_tokens = fz.reference.answer(ids, max_tokens, stops)
        assert (text, reason) == (want, want_reason)
        if usage is not None and want_tokens is not None:
            assert usage["completion_tokens"] == want_tokens


def note(what: str) -> None:
    """Counts `what` in hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


def stop_strings(stop) -> tuple[str, ...]:
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)


def check_healthy(fz: Fuzzed) -> None:
    """Every answered request has let go of its slot and its admission count (the loop ends
    a hung-up stream within a poll), the loop runs, and /health says ok."""
    loop = fz.server.loop
    deadline = time.monotonic() + 60  # (a poll is 0.5 s; a loaded machine may take more)
    while time.monotonic() < deadline and (loop._pending or _held(loop)):
        time.sleep(0.02)
    assert loop.alive and loop.error is None, loop.error
    assert loop._pending == 0, f"{loop._pending} admissions leaked"
    assert not _held(loop), {m: b.slot_request for m, b in loop.batchers.items()}
    r = fz.http.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def _held(loop) -> bool:
    return any(i is not None for b in loop.batchers.values() for i in b.slot_request)


def post(fz: Fuzzed, path: str, body, escaped: bool = True) -> httpx.Response:
    """POSTs `body` (bytes as they are)."""
    return fz.http.post(path, content=body if isinstance(body, bytes) else encode(body, escaped),
                        headers={"Content-Type": "application/json"})


def encode(body, escaped: bool = True) -> bytes:
    """JSON text, NaN and Infinity as bare tokens; `escaped`: non-ASCII as \\u escapes, else
    as raw UTF-8 (lone surrogates as their own three bytes, which Python's reader takes)."""
    return json.dumps(body, ensure_ascii=escaped).encode("utf-8", "surrogatepass")


def path_of(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


# ---- what to send -------------------------------------------------------------------------

ODD = ["\x00", "\u200b", "\u200d", "\u200e", "\u202e", "\u2066", "\ufeff", "\ufffd", "\uffff",
       "\u0301", "\U0001f600", "\U0010ffff", "\u05d0", "\u0627", "\r\n", "\t", "\\", '"',
       "</s>", "<s>", "<unk>", "{{", "{%"]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user", "n", "best_of",
          "echo", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias", "suffix", "tools", "tool_choice", "response_format", "functions"]

# Text without surrogates: mostly ASCII (prompts that fit), some of everything else.
TEXT = st.one_of(st.text(st.characters(max_codepoint=127), max_size=40),
                 st.lists(st.characters() | st.sampled_from(ODD), max_size=16).map("".join))
# With a lone surrogate somewhere: not Unicode, so never a prompt, message or stop string.
BROKEN_TEXT = st.tuples(TEXT, st.sampled_from(SURROGATES), TEXT).map("".join)
ANY_TEXT = TEXT | BROKEN_TEXT
HUGE = st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, 10**400, -(10**400), -(2**63)])
NUMBER = st.one_of(st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, ANY_TEXT)
ANY = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                   | st.dictionaries(ANY_TEXT, kids, max_size=4), max_leaves=12)
CONTAINER = st.one_of(st.lists(ANY, max_size=3), st.dictionaries(ANY_TEXT, ANY, max_size=3))


def _not(*types):
    """Any non-null JSON value whose Python type is none of `types` (bool is not an int)."""
    def ok(v):
        return v is not None and not (isinstance(v, types) and not (
            isinstance(v, bool) and bool not in types))
    return ANY.filter(ok)


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | TEXT,
                                 "content": TEXT})
# Stop strings the tiny model's code-like output often holds, and any text.
COMMON = st.sampled_from([" ", "\n", "e", "s", "t", "(", ")", ":", ".", "_", "in", "self", ""])
STOPS = st.one_of(st.none(), COMMON, TEXT, st.lists(COMMON, max_size=4),
                  st.lists(COMMON | TEXT, max_size=4))


@st.composite
def valid_bodies(draw, chat: bool) -> dict:
    """A body the API accepts (it may still be too long for max_len)."""
    too_long = st.integers(100, 2000).map(lambda n: "x " * n)
    if chat:
        required = {"messages": st.lists(MESSAGE, min_size=1, max_size=3)
                    | st.lists(st.fixed_dictionaries({"role": st.just("user"),
                                                      "content": too_long}), max_size=1,
                               min_size=1)}
    else:
        prompt = st.one_of(TEXT, st.just(""), too_long)
        required = {"prompt": prompt | prompt.map(lambda p: [p])}
    tokens = st.none() | st.integers(1, MAX_TOKENS)
    optional = {
        "model": st.sampled_from([MODEL, None]), "max_tokens": tokens,
        "top_p": st.floats(0.01, 1) | st.none(), "top_k": st.integers(-1, 2**31 - 1) | st.none(),
        "seed": st.integers(0, 2**31 - 1) | st.none(), "stop": STOPS, "stream": st.booleans(),
        "stream_options": st.none() | st.fixed_dictionaries(
            {}, optional={"include_usage": st.none() | st.booleans()}),
        "user": st.none() | TEXT, "n": st.sampled_from([1, None]),
        "logprobs": st.sampled_from([None, False]), "echo": st.sampled_from([None, False]),
        "presence_penalty": st.sampled_from([0, 0.0, None]), "logit_bias": st.none(),
    }
    if chat:
        optional["max_completion_tokens"] = tokens
    # Greedy a third of the time (its text is checked), absent (1.0) or sampled otherwise.
    required["temperature"] = st.sampled_from([0, 0.0, None]) | st.floats(0, 2)
    return draw(st.fixed_dictionaries(required, optional=optional))


def _bad_values(chat: bool) -> dict[str, st.SearchStrategy]:
    """Field -> values the API must refuse in it, each a 400 naming that field (the model:
    another name is a 404; max_tokens: one past the room left is a context-length 400)."""
    non_finite = st.sampled_from([math.nan, math.inf, -math.inf, 2**1024, -(10**400)])
    tokens = st.one_of(st.integers(max_value=0), st.floats(), HUGE, st.integers(min_value=MAX_LEN),
                       _not(int))
    prompt = st.one_of(
        st.none(), _not(str, list), BROKEN_TEXT, BROKEN_TEXT.map(lambda s: [s]),
        st.lists(st.integers(-5, 10**6), min_size=1, max_size=20),  # token ids, any ids
        st.lists(TEXT, min_size=2, max_size=4), st.just([]), st.lists(CONTAINER, min_size=1))
    message = st.one_of(
        _not(dict), st.fixed_dictionaries({"role": TEXT}), st.fixed_dictionaries(
            {"content": TEXT}), st.fixed_dictionaries({"role": _not(str), "content": TEXT}),
        st.fixed_dictionaries({"role": TEXT, "content": _not(str)}),
        st.fixed_dictionaries({"role": TEXT, "content": st.just([{"type": "text",
                                                                   "text": "hi"}])}),
        st.fixed_dictionaries({"role": BROKEN_TEXT, "content": TEXT}),
        st.fixed_dictionaries({"role": TEXT, "content": BROKEN_TEXT}))
    neutral_number = st.one_of(st.integers().filter(bool), st.floats().filter(bool), st.booleans(),
                               _not(int, float))
    bad = {
        "model": _not(str),
        "max_tokens": tokens,
        "temperature": st.one_of(st.floats(max_value=0).filter(lambda x: x < 0),  # not -0.0
                                 st.integers(max_value=-1), non_finite, _not(int, float)),
        "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True),
                           st.integers(max_value=0), st.integers(min_value=2), non_finite,
                           _not(int, float)),
        "top_k": st.one_of(st.integers(max_value=-2), st.integers(min_value=2**31), HUGE,
                           st.floats(), _not(int)),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31), st.floats(),
                          _not(int)),
        "stop": st.one_of(
            _not(str, list), st.lists(_not(str), min_size=1, max_size=3),
            st.integers(17, 5000).map(lambda n: ["s"] * n),  # thousands of stop strings
            st.integers(257, 3000).map(lambda n: "s" * n), BROKEN_TEXT,
            st.lists(BROKEN_TEXT, min_size=1, max_size=3)),
        "stream": _not(bool),  # (null is refused too; not pinned here)
        "stream_options": st.one_of(
            _not(dict), st.dictionaries(TEXT.filter(lambda k: k != "include_usage"), ANY,
                                        min_size=1, max_size=3),
            st.fixed_dictionaries({"include_usage": _not(bool)})),
        "user": _not(str),
        "n": st.one_of(st.integers().filter(lambda n: n != 1), st.floats(), _not(int)),
        "best_of": st.one_of(st.integers().filter(lambda n: n != 1), _not(int)),
        "echo": st.one_of(st.just(True), _not(bool)),
        "logprobs": st.one_of(st.just(True), st.integers(), _not(bool)),
        "top_logprobs": _not(),
        "presence_penalty": neutral_number, "frequency_penalty": neutral_number,
        "logit_bias": _not(), "suffix": _not(), "tools": _not(), "tool_choice": _not(),
        "response_format": _not(), "functions": _not(),
    }
    if chat:
        bad["messages"] = st.one_of(st.none(), _not(list), st.just([]),
                                    st.lists(message, min_size=1, max_size=3))
        bad["max_completion_tokens"] = tokens
        bad["prompt"] = ANY  # completions' field: unknown here
    else:
        bad["prompt"] = prompt
        bad["messages"] = ANY  # chat's fields: unknown here
        bad["max_completion_tokens"] = ANY
    return bad


BAD = {chat: _bad_values(chat) for chat in (False, True)}
UNKNOWN = ANY_TEXT.filter(lambda k: k not in FIELDS + ["parallel_tool_calls", "function_call"])


def field_names(known: list[str]) -> st.SearchStrategy[str]:
    """One of `known`, or an unknown name as often as any one of them (a plain one_of would
    draw mostly unknown names: hypothesis weighs each branch of the text strategy alike)."""
    return st.sampled_from([*known, None]).flatmap(
        lambda name: UNKNOWN if name is None else st.just(name))


FIELD = field_names(FIELDS)


def base_body(chat: bool) -> dict:
    if chat:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return {"model": MODEL, "prompt": "hi", "max_tokens": 1}


# ---- the properties -----------------------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(data=st.data(), chat=st.booleans(), escaped=st.booleans())
def test_an_accepted_body_gets_the_target_only_answer(fuzzed, data, chat, escaped):
    body = data.draw(valid_bodies(chat), label="body")
    r = post(fuzzed, path_of(chat), body, escaped)
    check_served(fuzzed, chat, body, r)
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=500)
@given(data=st.data(), chat=st.booleans(), escaped=st.booleans())
def test_a_bad_value_in_any_field_is_a_400_that_names_it(fuzzed, data, chat, escaped):
    field = data.draw(field_names(sorted(BAD[chat])), label="field")
    value = data.draw(BAD[chat].get(field, ANY), label="value")
    body = {**base_body(chat), field: value}
    r = post(fuzzed, path_of(chat), body, escaped)
    ours = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    if field in ours and type(value) is int and value >= MAX_LEN:  # past the room left
        check_error(r, 400, "max_tokens", "context_length_exceeded")
    else:
        check_error(r, 400, field)
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=60)
@given(data=st.data(), chat=st.booleans(), escaped=st.booleans())
def test_another_model_name_is_a_404(fuzzed, data, chat, escaped):
    name = data.draw(ANY_TEXT.filter(lambda s: s != MODEL), label="model")
    r = post(fuzzed, path_of(chat), {**base_body(chat), "model": name}, escaped)
    check_error(r, 404, "model", "model_not_found")
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=250)
@given(data=st.data(), chat=st.booleans(), escaped=st.booleans())
def test_any_json_gets_a_4xx_or_a_right_answer(fuzzed, data, chat, escaped):
    """Free-form: any JSON value, or an object of known and unknown keys with any values,
    some of them valid."""
    valid = valid_bodies(chat)
    body = data.draw(st.one_of(
        ANY, st.dictionaries(FIELD, ANY, max_size=6),
        st.tuples(valid, st.dictionaries(FIELD, ANY, max_size=2)).map(
            lambda t: {**t[0], **t[1]})), label="body")
    r = post(fuzzed, path_of(chat), body, escaped)
    if r.status_code == 200:
        check_served(fuzzed, chat, body, r)
    else:
        check_error(r)
    check_healthy(fuzzed)


NESTINGS = {"list": ("[", "]"), "dict": ('{"a":', "}"), "mixed": ('[{"a":', "}]")}


def _nested(depth: int, kind: str, closed: bool) -> bytes:
    opener, closer = NESTINGS[kind]
    return (opener * depth + "1" + (closer * depth if closed else "")).encode()


def _deep(kind: str) -> st.SearchStrategy[bytes]:
    """Nested as deep as MAX_BODY allows (30000 lists, 10000 objects), closed or not."""
    most = (MAX_BODY - 64) // len("".join(NESTINGS[kind]))
    return st.builds(_nested, st.integers(1, most), st.just(kind), st.booleans())


RAW = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(sorted(NESTINGS)).flatmap(_deep),
    st.builds(lambda field, nested: b'{"prompt": "hi", "' + field + b'": ' + nested + b"}",
              st.sampled_from([b"n", b"stop", b"logit_bias", b"unknown"]), _deep("list")),
    st.builds(lambda k, f: f'{{"prompt": "hi", "{f}": {"9" * k}}}'.encode(),  # 1e400 and up
              st.integers(400, 20000), st.sampled_from(["max_tokens", "temperature", "seed"])),
    st.builds(lambda f, t: f'{{"prompt": "hi", "{f}": {t}}}'.encode(),
              st.sampled_from(["max_tokens", "temperature", "top_p", "seed", "top_k", "n"]),
              st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "nan", "inf",
                               "0x10", "01", "1.", ".5", "+1", "--1", "1e", "\"1\""])),
    st.sampled_from([b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xc3"}', b"\xef\xbb\xbf{",
                     b'{"prompt": "hi"', b'{"prompt": "hi",}', b'{"prompt": "hi"}}',
                     b"{'prompt': 'hi'}", b'{"prompt": "hi", "prompt": 7}', b"", b"null",
                     b'"{\\"prompt\\": \\"hi\\"}"', b"[]", b"{}", b"\x00" * 100]),
    st.builds(lambda cut: json.dumps(base_body(False)).encode()[:cut],
              st.integers(0, len(json.dumps(base_body(False))) - 1)),
)


@settings(FUZZ, max_examples=150)
@given(raw=RAW, chat=st.booleans())
def test_bytes_that_are_no_acceptable_body_get_a_400(fuzzed, raw, chat):
    """Not JSON, not UTF-8, truncated, nested thousands deep, a number of 20000 digits, NaN:
    a 400 (the first few the parser's, with no param)."""
    r = post(fuzzed, path_of(chat), raw)
    check_error(r, 400)
    check_healthy(fuzzed)


def test_a_value_nested_as_deep_as_the_parser_goes_is_a_400_that_names_it(fuzzed):
    """The deepest lists the JSON parser takes, as a field's value that the error message
    quotes (a recursive repr would go as deep as the parser did, from a few frames further
    down the stack): every depth around the parser's limit is a 400. The limit depends on
    the server's stack and moves a little between requests; bisection finds it first."""
    def ask(depth: int) -> httpx.Response:
        return post(fuzzed, "/v1/completions",
                    b'{"prompt": "hi", "n": ' + _nested(depth, "list", True) + b"}")

    def too_deep(r: httpx.Response) -> bool:
        return r.status_code == 400 and "too deeply" in r.json()["error"]["message"]

    low, high = 1, (MAX_BODY - 64) // 2  # the parser takes `low` levels, not `high`
    assert not too_deep(ask(low)) and too_deep(ask(high))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if too_deep(ask(mid)) else (mid, high)
    for depth in range(max(1, low - 40), low + 40):
        err = check_error(ask(depth), 400)
        assert err["param"] == "n" or "too deeply" in err["message"], err
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=20)
@given(extra=st.integers(1, 3 * MAX_BODY), chunked=st.booleans(), chat=st.booleans())
def test_a_body_over_max_body_bytes_is_a_413(fuzzed, extra, chunked, chat):
    """Over the limit by content-length, or sent in chunks with no length at all."""
    body = dict(base_body(chat))
    body["user"] = ""
    body["user"] = "u" * (MAX_BODY + extra - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == MAX_BODY + extra
    content = iter([raw[i:i + 8192] for i in range(0, len(raw), 8192)]) if chunked else raw
    r = fuzzed.http.post(path_of(chat), content=content,
                         headers={"Content-Type": "application/json"})
    check_error(r, 413)
    check_healthy(fuzzed)


PATHS = ["/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
         "/admin/draft", "/", "/v1", "/v1/embeddings", "/admin", "/v1/completions/x",
         "/v1/models/tiny"]


@settings(FUZZ, max_examples=120)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(PATHS), body=st.none() | ANY,
       auth=st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", "", "Bearer wrong", KEY,
                             f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer  {KEY}"]))
def test_every_endpoint_under_every_method_answers_4xx_or_its_answer(fuzzed, method, path,
                                                                     body, auth):
    content = None if body is None else encode(body)
    r = fuzzed.http.request(method, path, headers={"Authorization": auth}, content=content)
    if auth.lower() != f"bearer {KEY}" and path != "/health":
        check_error(r, 401, None, "invalid_api_key")
    elif (method, path) == ("GET", "/health"):
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
    elif (method, path) == ("GET", "/metrics"):
        assert r.status_code == 200 and "aurora_jax:num_requests_running" in r.text
    elif (method, path) == ("GET", "/v1/models"):
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    elif (method, path) == ("GET", "/admin/draft"):
        assert r.status_code == 200 and r.json()["serving_version"] == 0
    elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions") \
            and r.status_code == 200:
        check_served(fuzzed, path.endswith("chat/completions"), body, r)
    else:
        check_error(r)
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=60)
@given(path=ANY_TEXT | st.sampled_from(["", ".", "/", "..", "~", "\x00", "a\x00b", "/tmp",
                                        "CKPT", "CKPT/config.json"]) | _not(str),
       extra=st.dictionaries(UNKNOWN, ANY, max_size=2))
def test_loading_a_draft_from_a_bad_path_is_a_400(fuzzed, path, extra):
    """/admin/draft with anything but an EAGLE-3 draft directory (the target's own
    directory, a file, no directory, a NUL byte, no string at all)."""
    if isinstance(path, str):
        path = path.replace("CKPT", str(fuzzed.ckpt))
    r = post(fuzzed, "/admin/draft", {"path": path, **extra}, escaped=False)
    check_error(r, 400, "path")
    check_healthy(fuzzed)


STOP_PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n", "class Config:\n    def",
                "for i in range(10):", "The standard library"]


def _stop_case(fz: Fuzzed, where: str) -> tuple[str, int, str]:
    """(prompt, max_tokens, stop string) where the stop string is the text of the greedy
    answer's first token, or of its last token (max_tokens) and not found before it."""
    tokenizer = fz.server.tokenizer
    for prompt in STOP_PROMPTS:
        tokens, _ = fz.reference.tokens(tokenizer.encode(prompt))
        texts = [tokenizer.decode(tokens[:k]) for k in range(len(tokens) + 1)]
        for m in [1] if where == "first" else range(2, len(tokens) + 1):
            new = texts[m][len(texts[m - 1]):]
            if new and texts[m].startswith(texts[m - 1]) and \
                    texts[m].find(new) == len(texts[m - 1]):
                return prompt, MAX_TOKENS if where == "first" else m, new
    raise AssertionError(f"no prompt in {STOP_PROMPTS} makes a {where}-token stop string")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_stop_string_in_the_first_or_last_token_ends_the_request_cleanly(fuzzed, where,
                                                                            stream):
    """Found by the fuzzer: a stop string that the request's first token completed left its
    slot held for good (the server spinning on it); one that its last token completed failed
    the serving loop (every later request a 500 or a hang)."""
    prompt, max_tokens, stop = _stop_case(fuzzed, where)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stop": [stop], "stream": stream}
    r = post(fuzzed, "/v1/completions", body)
    check_served(fuzzed, False, body, r)  # the target-only text, cut before the stop string
    assert read_answer(r, False, stream, False)[1] == "stop"
    check_healthy(fuzzed)


@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_a_burst_of_fuzzed_requests_with_hangups_leaves_nothing_behind(fuzzed, data):
    """Ten requests at once, good and bad, some streams hung up after their first chunk: each
    is answered (a 429 when the server is full), and afterwards no slot or count is held."""
    def bodies(chat):  # (whether the API accepts it, the body)
        other = st.dictionaries(FIELD, ANY, max_size=4)
        return st.one_of(valid_bodies(chat).map(lambda b: (True, b)),
                         other.map(lambda b: (False, b)))

    asks = data.draw(st.lists(st.tuples(
        st.booleans(), st.booleans(), st.booleans().flatmap(
            lambda chat: st.tuples(st.just(chat), bodies(chat)))), min_size=10, max_size=10),
        label="asks")

    def ask(item):
        hang_up, escaped, (chat, (_, body)) = item
        if hang_up and body.get("stream") is True:
            with fuzzed.http.stream("POST", path_of(chat), content=encode(body, escaped)) as r:
                if r.status_code == 200:
                    next(r.iter_lines())  # one line, then the client goes away
                    return None
                r.read()
                return r
        return post(fuzzed, path_of(chat), body, escaped)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, asks))
    for (_, _, (chat, (valid, body))), r in zip(asks, answers, strict=True):
        if r is None:
            continue
        if valid:
            check_served(fuzzed, chat, body, r, busy_ok=True)
        elif r.status_code == 200:
            check_served(fuzzed, chat, body, r)
        else:
            check_error(r)
    check_healthy(fuzzed)

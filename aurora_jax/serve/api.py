"""Request bodies of the OpenAI API, checked: every field we serve, every field we refuse.

A body is a plain JSON object (parsed by the handler); `parse_completion` and `parse_chat`
turn it into a `Parsed` request or raise `APIError`, which the app answers with OpenAI's
error object and the status it carries. Unknown fields and fields we do not support (`n` > 1,
`logprobs`, penalties, ...) are refused by name, never silently ignored; so is a value of the
wrong type (`true` is not the integer 1 here), a number past what the engine holds, and text
that is not valid Unicode (a lone surrogate from a `\\ud800` escape).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any

from aurora_jax.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

# Fields accepted only at null or a value that means "not used" (clients send them by
# default), compared with its type: `"n": true` equals 1 in Python but is not an integer.
# Chat's `logprobs` is a boolean whose default is false; completions' is an integer or null.
_NEUTRAL: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (),
    "suffix": (), "tools": (), "tool_choice": (), "response_format": (),
    "parallel_tool_calls": (), "functions": (), "function_call": ()}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
           "stream_options", "user", "seed"}
_COMPLETION = _COMMON | {"prompt"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Parsed:
    model: str | None
    max_tokens: int | None
    sampling: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    prompt: str | None = None  # completions
    messages: list[dict] | None = None  # chat


def parse_completion(body: Any) -> Parsed:
    body = _object(body)
    _check_fields(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        raise APIError(400, "prompt as token ids is not supported by this server; send the "
                            "prompt text", "prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", "prompt")
    prompt = _unicode(prompt, "prompt", "prompt")
    return dataclasses.replace(_common(body, ("max_tokens",)), prompt=prompt)


def parse_chat(body: Any) -> Parsed:
    body = _object(body)
    _check_fields(body, _CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise APIError(400, f"messages[{i}] must be an object with string role and "
                                "content", "messages")
        for key in ("role", "content"):
            _unicode(m[key], "messages", f"messages[{i}].{key}")
    parsed = _common(body, ("max_completion_tokens", "max_tokens"))
    return dataclasses.replace(parsed, messages=[{"role": m["role"], "content": m["content"]}
                                                 for m in messages])


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in _NEUTRAL:
            if value is not None and not any(type(value) is type(v) and value == v
                                             for v in _NEUTRAL[key]):
                raise APIError(400, f"{key}={_show(value)} is not supported by this server",
                               key)
            continue
        raise APIError(400, f"unknown or unsupported parameter {_show(key)}", key)


def _common(body: dict, max_keys: tuple[str, ...]) -> Parsed:
    """The fields both endpoints share; `max_keys`: the names of max_tokens, the first one
    given wins (chat's max_completion_tokens before its older max_tokens)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    user = body.get("user")  # unused, but a wrong type is a client bug worth naming
    if user is not None and not isinstance(user, str):
        raise APIError(400, "user must be a string", "user")
    for key in max_keys:  # both checked: a bad one is refused even where the other wins
        value = body.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise APIError(400, f"{key} must be an integer >= 1, got {_show(value)}", key)
    max_tokens = next((body[k] for k in max_keys if body.get(k) is not None), None)
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = body.get("top_k", 0)
    if top_k is None:
        top_k = 0
    # The engine holds top_k as int32: a larger one would fail the serving loop, not this
    # request (any k past the vocabulary already means all tokens).
    if not _is_int(top_k) or not -1 <= top_k < 2**31:
        raise APIError(400, f"top_k must be an integer in [0, 2**31) (or -1: all), got "
                            f"{_show(top_k)}", "top_k")
    if temperature < 0:
        raise APIError(400, f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**31):
        raise APIError(400, f"seed must be an integer in [0, 2**31), got {_show(seed)}",
                       "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options")
    options = {} if options is None else options  # 0, "" or [] is refused, not read as absent
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options must be an object that may only hold "
                            "include_usage", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be true or false",
                       "stream_options")
    return Parsed(model=model, max_tokens=max_tokens,
                  sampling=SamplingParams(temperature, top_p, max(int(top_k), 0), seed),
                  stops=_stops(body.get("stop")), stream=stream,
                  include_usage=bool(include_usage))


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # an integer past 1e308: as bad as inf (no 500 from isfinite)
            x = math.inf
        if math.isfinite(x):
            return x
    raise APIError(400, f"{key} must be a finite number, got {_show(value)}", key)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most "
                            f"{MAX_STOP_CHARS} characters", "stop")
    return tuple(_unicode(s, "stop", "a stop string") for s in stops if s)


def _unicode(text: str, param: str, what: str) -> str:
    """`text` if it is valid Unicode. A `\\ud800` escape (or a surrogate's UTF-8 bytes) in the
    body parses to a lone surrogate, which no tokenizer encodes: a 500 unless refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{what} is not valid Unicode: a lone surrogate "
                            f"{text[e.start]!r} at character {e.start}", param) from e
    return text


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


def _show(value: Any) -> str:
    """A client's value quoted in an error message, cut short (two levels, 60 characters): an
    error need not echo a 60 KB value, and the builtin repr recurses as deep as the value is
    nested, which the JSON parser allowed from a few frames higher up the stack."""
    return _REPR.repr(value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

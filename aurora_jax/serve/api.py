"""Request bodies of the OpenAI API, checked: every field we serve, every field we refuse.

A body is a plain JSON object (parsed by the handler); `parse_completion` and `parse_chat`
turn it into a `Parsed` request or raise `APIError`, which the app answers with OpenAI's
error object and the status it carries. Unknown fields and fields we do not support (`n` > 1,
`logprobs`, penalties, ...) are refused by name, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from aurora_jax.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

# Fields accepted only at the value that means "not used" (clients send them by default).
_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None,
            "tools": None, "tool_choice": None, "response_format": None,
            "parallel_tool_calls": None, "functions": None, "function_call": None}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
           "stream_options", "user", "seed"}
_COMPLETION = _COMMON | {"prompt"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

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
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", "prompt")
    return dataclasses.replace(_common(body, "max_tokens"), prompt=prompt)


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
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    parsed = _common(body, key)
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
            if value != _NEUTRAL[key] and value is not None:
                raise APIError(400, f"{key}={value!r} is not supported by this server", key)
            continue
        raise APIError(400, f"unknown or unsupported parameter {key!r}", key)


def _common(body: dict, max_key: str) -> Parsed:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    max_tokens = body.get(max_key)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise APIError(400, f"{max_key} must be an integer >= 1, got {max_tokens!r}", max_key)
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = body.get("top_k", 0)
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or top_k < -1:
        raise APIError(400, f"top_k must be an integer >= 0 (or -1: all), got {top_k!r}",
                       "top_k")
    if temperature < 0:
        raise APIError(400, f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**31):
        raise APIError(400, f"seed must be an integer in [0, 2**31), got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options may only hold include_usage", "stream_options")
    return Parsed(model=model, max_tokens=max_tokens,
                  sampling=SamplingParams(temperature, top_p, max(int(top_k), 0), seed),
                  stops=_stops(body.get("stop")), stream=stream,
                  include_usage=bool(options.get("include_usage", False)))


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a finite number, got {value!r}", key)
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most "
                            f"{MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in stops if s)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

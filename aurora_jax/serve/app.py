"""The HTTP front end: an ASGI app (FastAPI) over the serving loop.

Handlers parse and check the body (serve/api.py), tokenize, enqueue a `Ticket` and then only
stream what the loop posts back; they never touch the engine. A client that disconnects
cancels its request (its slot is free before the next step). Every error is OpenAI's error
object with a 4xx/5xx status. With an API key, every endpoint but /health needs
`Authorization: Bearer <key>` (compared in constant time); /admin/* needs a key set at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.batcher import Request as EngineRequest
from aurora_jax.engine.batcher import RequestResult
from aurora_jax.engine.engine import Engine
from aurora_jax.errors import AuroraError
from aurora_jax.serve.api import APIError, Parsed, parse_chat, parse_completion
from aurora_jax.serve.config import ServeConfig
from aurora_jax.serve.loop import ServerBusy, ServingLoop, ShuttingDown, Ticket
from aurora_jax.serve.metrics import ServerMetrics
from aurora_jax.serve.text import TextStream


class Server(Protocol):
    """What the app reads of the server it fronts (serve/server.Server)."""

    cfg: ServeConfig
    tokenizer: Tokenizer
    model_name: str
    started: int
    loop: ServingLoop
    metrics: ServerMetrics
    engines: dict[str, Engine]

    def draft_status(self) -> dict: ...

    def load_draft(self, path: str) -> int: ...


RETRY_AFTER_S = 1
"""What a 429 (the queue is full) tells the client to wait before it tries again."""


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="aurora-jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> Response:
        return _error(e, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> Response:
        # Starlette's own 404 (no such path) and 405 (wrong method): OpenAI's error object too,
        # not {"detail": ...}.
        return _error(APIError(e.status_code, str(e.detail)), e.headers)

    @app.middleware("http")
    async def check_access(request: Request, call_next):  # the key, the body size
        try:
            _check_key(server, request)
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > server.cfg.max_body_bytes):
                raise APIError(413, f"request body over {server.cfg.max_body_bytes} bytes")
        except APIError as e:
            return _error(e)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if server.loop.error is not None:
            return JSONResponse({"status": "failed", "error": str(server.loop.error)}, 503)
        if not server.loop.ready.is_set():
            return JSONResponse({"status": "starting"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.started, "owned_by": "aurora-jax"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = parse_completion(await _body(request, server))
        return await _serve(server, request, parsed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        parsed = parse_chat(await _body(request, server))
        return await _serve(server, request, parsed, chat=True)

    @app.get("/admin/draft")
    async def draft_status(request: Request) -> dict:
        _check_admin(server)
        return server.draft_status()

    @app.post("/admin/draft")
    async def draft_load(request: Request) -> dict:
        _check_admin(server)
        body = await _body(request, server)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise APIError(400, 'expected {"path": "<EAGLE-3 draft directory>"}', "path")
        try:
            version = await asyncio.to_thread(server.load_draft, body["path"])
        except AuroraError as e:
            raise APIError(400, str(e), "path") from e
        return {"loaded": body["path"], "version": version}

    return app


async def _body(request: Request, server: Server):
    raw = await request.body()
    if len(raw) > server.cfg.max_body_bytes:
        raise APIError(413, f"request body over {server.cfg.max_body_bytes} bytes")
    try:
        return json.loads(raw)
    except RecursionError as e:  # the parser recurses per level: [[[[... a thousand deep
        raise APIError(400, "the body is nested too deeply to parse") from e
    except ValueError as e:  # bad JSON or bytes, or an integer of more than 4300 digits
        raise APIError(400, f"the body is not valid JSON ({e})") from e


def _error(e: APIError, headers: Mapping[str, str] | None = None) -> Response:
    """OpenAI's error object, ASCII-escaped: a param may be a key from the body holding a lone
    surrogate, which JSONResponse's UTF-8 rendering cannot encode (a 500 instead)."""
    return Response(json.dumps(e.body()), status_code=e.status, headers=headers,
                    media_type="application/json")


def _check_key(server: Server, request: Request) -> None:
    key = server.cfg.resolved_api_key
    if key is None or request.url.path == "/health":
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "invalid or missing API key", kind="authentication_error",
                       code="invalid_api_key")


def _check_admin(server: Server) -> None:
    if server.cfg.resolved_api_key is None:
        raise APIError(403, "the admin endpoints need an API key (api_key or "
                            "$AURORA_JAX_API_KEY)", kind="permission_error")


async def _serve(server: Server, http: Request, parsed: Parsed, chat: bool) -> Response:
    if parsed.model is not None and parsed.model != server.model_name:
        raise APIError(404, f"model {parsed.model!r} does not exist; this server serves "
                            f"{server.model_name!r}", "model", code="model_not_found")
    try:
        prompt = (server.tokenizer.encode_chat(parsed.messages or []) if chat
                  else server.tokenizer.encode(parsed.prompt or ""))
    except AuroraError as e:
        raise APIError(400, str(e), "messages" if chat else "prompt") from e
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    room = server.cfg.max_len - len(prompt)
    max_tokens = parsed.max_tokens or min(server.cfg.default_max_tokens, room)
    if max_tokens > room or room < 1:
        raise APIError(400, f"this model's maximum context length is {server.cfg.max_len} "
                            f"tokens; the prompt has {len(prompt)} and max_tokens is "
                            f"{max_tokens}", "max_tokens" if room >= 1 and parsed.max_tokens
                       else "prompt",
                       code="context_length_exceeded")
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex  # also its trace's id
    ticket = Ticket(EngineRequest(prompt, max_tokens, parsed.sampling, id=ident),
                    TextStream(server.tokenizer.decode, parsed.stops), asyncio.Queue(),
                    asyncio.get_running_loop())
    try:
        server.loop.submit(ticket)
    except ServerBusy as e:
        # (OpenAI's clients wait Retry-After seconds before they try again)
        raise APIError(429, str(e), kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    except ShuttingDown as e:
        raise APIError(503, str(e), kind="server_error") from e
    except AuroraError as e:
        raise APIError(400, str(e), "prompt") from e
    if parsed.stream:
        return StreamingResponse(_stream(server, http, ticket, parsed, chat, ident),
                                 media_type="text/event-stream")
    text, reason, res = [], "abort", None
    async for event in _events(server, http, ticket):
        if event[0] == "delta":
            text.append(event[1])
        else:
            reason, res = event[1], event[2]
    body = _envelope(server, ident, chat, final=True)
    body["choices"] = [_choice(chat, "".join(text), reason, final=True)]
    body["usage"] = _usage(server, ticket, res)
    return JSONResponse(body)


async def _events(server: Server, http: Request, ticket: Ticket) -> AsyncGenerator[tuple, None]:
    """The ticket's events until it ends; a disconnected client cancels it."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(ticket.events.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    server.loop.cancel(ticket)
                    return
                continue
            if event[0] == "error":
                raise APIError(500, event[1], kind="server_error")
            yield event
            if event[0] == "end":
                return
    finally:  # the generator closed early (client gone): free the slot
        if not ticket.ended:
            server.loop.cancel(ticket)


async def _stream(server: Server, http: Request, ticket: Ticket, parsed: Parsed, chat: bool,
                  ident: str) -> AsyncIterator[str]:
    first = True
    async with contextlib.aclosing(_events(server, http, ticket)) as events:
        async for event in events:
            body = _envelope(server, ident, chat, final=False)
            if event[0] == "delta":
                body["choices"] = [_choice(chat, event[1], None, final=False, role=first)]
                first = False
                yield f"data: {json.dumps(body)}\n\n"
                continue
            reason, res = event[1], event[2]
            body["choices"] = [_choice(chat, "", reason, final=False, role=first)]
            yield f"data: {json.dumps(body)}\n\n"
            if parsed.include_usage:
                usage = _envelope(server, ident, chat, final=False)
                usage["choices"] = []
                usage["usage"] = _usage(server, ticket, res)
                yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _envelope(server: Server, ident: str, chat: bool, final: bool) -> dict:
    kind = ("chat.completion" if final else "chat.completion.chunk") if chat else \
        "text_completion"
    return {"id": ident, "object": kind, "created": int(time.time()),
            "model": server.model_name}


def _choice(chat: bool, text: str, reason: str | None, final: bool, role: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    if final:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": reason, "logprobs": None}
    delta = {"role": "assistant"} if role else {}
    if text:
        delta["content"] = text
    return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}


def _usage(server: Server, ticket: Ticket, res: RequestResult | None) -> dict:
    """OpenAI's usage, and how the request was served: its acceptance length, target
    forwards, the draft version that proposed (None when no draft model did) and the
    speculation setting (the adaptive policy's choice for it; "off": target-only)."""
    prompt_tokens = len(ticket.request.prompt)
    completion = len(res.token_ids) if res is not None else 0
    tau = res.acceptance_length if res is not None else None
    engine = server.engines.get(ticket.mode) if ticket.mode is not None else None
    drafted = engine is not None and engine.draft is not None
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "acceptance_length": None if tau is None else round(tau, 4),
            "target_forwards": res.target_forwards if res is not None else 0,
            "draft_version": max(res.draft_versions) if drafted and res and res.draft_versions
            else None,
            "speculation": engine.spec.label if engine is not None else None}

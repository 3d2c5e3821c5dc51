"""The HTTP side: FastAPI routes in OpenAI's format, the gate (API key, body size) and errors.

Design choices:
- `Gate`, a plain ASGI wrapper outside FastAPI, answers before any route runs: a missing or wrong
  API key on /v1/* is a 401 (compared in constant time), a body over the limit a 413, whether
  the size is declared or the body is streamed in chunks. Only then does the body reach FastAPI.
- Every error is an OpenAI error object: validation (400, naming the field), unknown model or
  adapter (404), unknown route (404), wrong method (405), a full queue (429), shutting down
  (503), a failure while generating (500). Nothing a request sends is raised past its handler.
- A stream is server-sent events ending in `data: [DONE]`; each wake-up of a request writes all
  its pending tokens at once, so a busy server sends fewer, larger chunks instead of falling
  behind. A client that goes away cancels its job (Starlette cancels the stream when the
  connection drops; a non-streamed request watches for the disconnect while it waits), which
  frees its slots at the scheduler's next iteration.
- The web page at / is one static HTML file (no build step) that talks to the same API.
- Shutdown (uvicorn's, on SIGINT/SIGTERM) first lets open responses finish, then the lifespan
  closes the scheduler, which finishes whatever it still runs.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Shape,
    TokenText,
    sse,
    validation_error,
)

PAGE = Path(__file__).parent / "static" / "index.html"


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """API key and body size, checked before the application sees a request."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "a wrong API key" if given else "no API key (send 'Authorization: Bearer KEY')"
                return await _send_error(send, ApiError(401, f"the request has {what}", code="invalid_api_key"))
        too_big = ApiError(413, f"the request body is larger than {self.max_body} bytes", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _send_error(send, too_big if declared.isdigit() else ApiError(400, "bad Content-Length"))
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()          # later: the disconnect, for cancellation
        return await self.app(scope, replay, send)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service, api_key: str | None = None, max_body: int = 1 << 20):
    """The ASGI application of `service` (a `service.Service`)."""

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        service.start(loop)
        yield
        await loop.run_in_executor(None, service.close)

    app = FastAPI(title="tinygpt", docs_url=None, redoc_url=None, lifespan=lifespan)
    text_of = TokenText(service.tok)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {kind}",
                                        code="not_found" if exc.status_code == 404 else None))

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():     # off the event loop: an engine in another process is asked and may take a moment
        stats = await asyncio.get_running_loop().run_in_executor(None, service.scheduler.stats)
        return {"status": "ok", **stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": service.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        card = next((c for c in service.model_cards() if c["id"] == model_id), None)
        if card is None:
            raise ApiError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return card

    @app.post("/v1/chat/completions", openapi_extra=_schema(ChatRequest))
    async def chat(request: Request):
        req = await _body(request, ChatRequest)
        job, n_prompt = service.chat(req)
        shape = Shape(True, req.model, req.logprobs, text_of)
        return await _answer(job, shape, req, request, n_prompt, [""] * req.n)

    @app.post("/v1/completions", openapi_extra=_schema(CompletionRequest))
    async def completions(request: Request):
        req = await _body(request, CompletionRequest)
        job, n_prompt, texts = service.completion(req)
        shape = Shape(False, req.model, req.logprobs is not None, text_of)
        echo = [t if req.echo else "" for t in texts for _ in range(req.n)]
        return await _answer(job, shape, req, request, n_prompt, echo)

    return Gate(app, api_key, max_body)


def _schema(model) -> dict:
    """The request body's schema for /openapi.json (the routes read the body themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _body(request: Request, model):
    """The request body parsed and validated in one pass (pydantic's JSON parser): a request body
    as a route parameter costs FastAPI's dependency machinery on every request, a few hundred
    microseconds that a burst of streams pays one after another before its first tokens."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e.errors()) from None


async def _answer(job, shape: Shape, req, request: Request, n_prompt: int, echo: list[str]):
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_stream(job, shape, n_prompt, usage, echo), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.ensure_future(_collect(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            job.cancel()
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return JSONResponse({}, status_code=499)      # nobody is listening any more
    texts, entries, finishes, n_new = collect.result()
    if "error" in finishes.values():
        raise ApiError(500, "generation failed; see the server log", "server_error")
    texts = {i: echo[i] + t for i, t in texts.items()}
    return shape.response(texts, entries, finishes, n_prompt, n_new)


async def _collect(job):
    texts = {i: "" for i in range(job.n)}
    entries = {i: [] for i in range(job.n)}
    finishes, n_new = {}, 0
    try:
        async for merged in job.updates():
            for i, u in merged.items():
                texts[i] += u.text
                entries[i] += u.tokens
                n_new += u.n_tokens
                if u.finish:
                    finishes[i] = u.finish
    finally:
        job.cancel()
    return texts, entries, finishes, n_new


async def _stream(job, shape: Shape, n_prompt: int, usage: bool, echo: list[str]):
    n_new = 0
    try:
        first = [sse(shape.chunk(i, echo[i] or None, [], None, first=shape.chat)) for i in range(job.n)
                 if shape.chat or echo[i]]
        if first:
            yield "".join(first)
        async for merged in job.updates():
            parts = []
            for i, u in sorted(merged.items()):
                n_new += u.n_tokens
                if u.finish == "error":
                    parts.append(sse(ApiError(500, "generation failed; see the server log", "server_error").body()))
                    continue
                if u.text or u.tokens:
                    parts.append(sse(shape.chunk(i, u.text, u.tokens, None)))
                if u.finish:
                    parts.append(sse(shape.chunk(i, None, [], u.finish)))
            if parts:
                yield "".join(parts)
        if usage:
            yield sse(shape.usage_chunk(n_prompt, n_new))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()                # the client went away (or we are done): free the slots

"""The OpenAI-compatible HTTP API over an `Engine`, on FastAPI (Starlette) for uvicorn.

`POST /v1/chat/completions` and `/v1/completions`, streamed as server-sent events
(`chat.completion.chunk` / `text_completion`, then `data: [DONE]`) or whole; `GET /v1/models`,
`/health`, `/slots` (busy slots, queue depth, tokens/s) and `/`, a one-file chat page.

Bad requests get OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) naming
the field, with 400 (a bad value), 401 (a wrong or missing API key, compared in constant time),
404 (an unknown model), 413 (a body over the limit) or 429 with `Retry-After` (every slot busy
and the queue full); the engine is not touched by any of them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from scanlab.decoder.chat import AnswerText
from scanlab.errors import ArgumentError
from scanlab.serve.engine import CANCELLED, Engine, EngineBusy

log = logging.getLogger("scanlab.serve")
MAX_BODY_BYTES = 1 << 20


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Options(BaseModel):
    """What both endpoints take. Fields other clients send and scanlab does not use (e.g.
    `user`, `logprobs` false) are ignored; a known field of the wrong type is refused."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # llama-server's extensions
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # llama-server's and vLLM's: the whole budget, past stop tokens
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self) -> dict[str, Any]:
        """The engine's sampling keywords. At temperature 0 (greedy) the filters change
        nothing, so they are not passed (the engine refuses them there, as `generate` does)."""
        options: dict[str, Any] = dict(
            temperature=self.temperature,
            repetition_penalty=self.repetition_penalty,
            seed=0 if self.seed is None else self.seed,
            ignore_eos=self.ignore_eos,
        )
        if self.temperature > 0:
            options |= dict(top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        return options

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Options):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Options):
    prompt: str | list[str]


class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        body = {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_app(
    engine: Engine, model_name: str, *, api_key: str | None = None, max_body_bytes=MAX_BODY_BYTES
) -> FastAPI:
    """The API serving `engine`'s model under `model_name`; with `api_key`, every route but
    `/health` and `/` asks for `Authorization: Bearer API_KEY`."""
    app = FastAPI(title="scanlab serve", docs_url=None, redoc_url=None)
    tokenizer = engine.model.tokenizer

    @app.middleware("http")
    async def limits(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return APIError(413, f"the request body must be <= {max_body_bytes} bytes").response()
        if api_key is not None and request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(
                    401, "a wrong or missing API key (Authorization: Bearer KEY)"
                ).response()
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first['msg']}").response()
        location = [str(part) for part in first["loc"] if part != "body"]
        param = location[0] if location else None
        where = ".".join(location) or "the body"
        return APIError(400, f"{where}: {first['msg']}", param).response()

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return error.response(headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/slots")
    async def slots():
        return vars(engine.stats())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name)]}

    page_html = resources.files("scanlab.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        _check_model(body.model, model_name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = tokenizer.encode(tokenizer.chat(messages), add_special_tokens=False)
        except (ArgumentError, jinja2.TemplateError) as error:
            raise APIError(
                400, f"messages: the chat template refused them: {error}", "messages"
            ) from None
        return await _answer(engine, body, prompt, "messages", chat=True, model_name=model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt: one prompt per request, got {len(prompts)}", "prompt")
        prompt = tokenizer.encode(prompts[0])
        return await _answer(engine, body, prompt, "prompt", chat=False, model_name=model_name)

    return app


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "scanlab"}


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise APIError(
            404, f"model: this server has {served!r}, got {asked!r}", "model", "model_not_found"
        )


async def _answer(engine: Engine, body: Options, prompt, prompt_field: str, *, chat, model_name):
    """Submits the request; the whole answer, or a stream of its pieces."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    try:
        request = engine.check(prompt, max_tokens, **body.sampling())
    except ArgumentError as error:
        message = str(error)
        param = message.split()[0] if message.split()[0] in Options.model_fields else prompt_field
        raise APIError(400, message, param) from None
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def deliver(ids: list[int], end: str | None) -> None:  # on the engine's thread
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, (ids, end))
        except RuntimeError:  # the server's loop has closed: no one is left to tell
            pass

    try:
        ticket = engine.submit(request, deliver)
    except EngineBusy as error:
        raise APIError(429, str(error)) from None
    reply = _Reply(engine, body, len(prompt), chat, model_name)
    if body.stream:
        return StreamingResponse(_events(reply, pieces, ticket), media_type="text/event-stream")
    try:
        text = "".join([piece async for piece in reply.pieces(pieces, ticket)])
    finally:
        ticket.cancel()
    return reply.whole(text)


class _Reply:
    """One answer's bookkeeping: its text, counts, timing and the OpenAI objects that carry it."""

    def __init__(self, engine: Engine, body: Options, prompt_tokens: int, chat: bool, name: str):
        self.answer = AnswerText(engine.model.tokenizer, body.stops())
        self.body, self.chat, self.name = body, chat, name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.finish_reason: str | None = None
        self.start = time.perf_counter()
        self.first_token_s: float | None = None

    async def pieces(self, pieces: asyncio.Queue, ticket) -> AsyncIterator[str]:
        """The answer's text pieces as the engine delivers its tokens."""
        while self.finish_reason is None:
            ids, end = await pieces.get()
            if self.first_token_s is None and ids:
                self.first_token_s = time.perf_counter() - self.start
            self.completion_tokens += len(ids)
            piece = self.answer.push(ids, final=end is not None)
            if self.answer.stopped:  # a stop string: the answer ends before it
                ticket.cancel()
                end = "stop"
            if piece:
                yield piece
            if end is not None:
                self.finish_reason = "stop" if end == CANCELLED else end
        self._log()

    def _log(self) -> None:
        first = "-" if self.first_token_s is None else f"{self.first_token_s:.2f} s"
        log.info(
            "%s: %d prompt + %d completion tokens in %.2f s (first token %s), finish %s",
            self.id,
            self.prompt_tokens,
            self.completion_tokens,
            time.perf_counter() - self.start,
            first,
            self.finish_reason,
        )

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def envelope(self, choices: list[dict], kind: str) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.name,
            "choices": choices,
        }

    def whole(self, text: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text, "logprobs": None}, "text_completion"
        choice["finish_reason"] = self.finish_reason
        return self.envelope([choice], kind) | {"usage": self.usage()}

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, text: str | None, finish_reason: str | None = None, role=False) -> dict:
        if not self.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None}
            return self.envelope([choice | {"finish_reason": finish_reason}], self.chunk_kind)
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self.envelope([choice], self.chunk_kind)


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(reply: _Reply, pieces: asyncio.Queue, ticket) -> AsyncIterator[str]:
    """The answer as server-sent events; a client that goes away cancels the request (Starlette
    closes this generator), freeing its slot at the next dispatch."""
    try:
        if reply.chat:
            yield _event(reply.chunk("", role=True))
        async for piece in reply.pieces(pieces, ticket):
            yield _event(reply.chunk(piece))
        yield _event(reply.chunk(None if reply.chat else "", reply.finish_reason))
        options = reply.body.stream_options
        if options is not None and options.include_usage:
            yield _event(reply.envelope([], reply.chunk_kind) | {"usage": reply.usage()})
        yield _event("[DONE]")
    finally:
        ticket.cancel()

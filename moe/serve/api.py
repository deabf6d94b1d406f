"""The OpenAI API over the engine (FastAPI): what any OpenAI client can point at.

    POST /v1/completions        a prompt (text, or token ids) continued
    POST /v1/chat/completions   messages through the instruction template <|user|> ... <|assistant|>
    GET  /v1/models             the one model served
    GET  /health                200 while serving
    GET  /metrics               Prometheus text (moe/serve/metrics.py)

`stream: true` answers by server-sent events, a chunk per piece of text, then `data: [DONE]`.
Supported: max_tokens (max_completion_tokens), temperature, top_p, stop (strings), seed, n = 1,
stream_options.include_usage, and vLLM's `ignore_eos` (generate exactly max_tokens, for load
tests). Options that would change the output but are not implemented (logprobs, echo, best_of,
suffix, penalties, logit_bias, tools) are refused rather than ignored. Errors have OpenAI's body,
{"error": {"message", "type", "param", "code"}}: 400 for a bad request, 429 (with Retry-After)
when the queue is full.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from ..infer.engine import Engine
from ..infer.engine import Request as EngineRequest
from ..infer.prompts import TextStream, prompt_with_images
from ..infer.sampling import SamplingParams
from ..tokenizer import EOT, USER, instruction_prompt
from .loop import EngineFailed, EngineLoop, QueueFull, Ticket
from .metrics import ServerMetrics

log = logging.getLogger("moe.serve")


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- requests --------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # accepted at their no-op values only
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    tools: list | None = None

    def unsupported(self) -> list[str]:
        """The options set to something this server would not honour."""
        unset = {"logprobs": (None, False), "presence_penalty": (0,), "frequency_penalty": (0,),
                 "logit_bias": (None, {}), "tools": (None, [])}
        found = [name for name, fine in unset.items() if getattr(self, name) not in fine]
        return found + (["n"] if self.n != 1 else [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + [name for name in ("echo", "suffix") if getattr(self, name)] + \
            (["best_of"] if self.best_of not in (None, 1) else [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens


# ---- turning requests into prompts and text --------------------------------------------------

def completion_prompt(body: CompletionRequest, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """Text starts a document (after <|endoftext|>, as generate.py's prompts do); token ids go as given."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(f"{len(prompt)} prompts in one request: this server takes one (send one request each)",
                           "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt_with_images(tokenizer, prompt, [], None)[0]
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    return list(prompt)


def chat_prompt(messages: list[ChatMessage], tokenizer: Tokenizer) -> list[int]:
    """`<|user|> u1 <|assistant|> a1 <|endoftext|> <|user|> u2 <|assistant|>`: the turns as the
    instruction data trains them, system text before the first user turn's."""
    system = "\n\n".join(m.text for m in messages if m.role in ("system", "developer"))
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if not turns or turns[-1].role != "user":
        raise APIError("the last message must be the user's (the reply is the assistant's)", "messages")
    ids, first = [], True
    for message in turns:
        if message.role == "user":
            ids += instruction_prompt(tokenizer, f"{system}\n\n{message.text}" if system and first else message.text)
            first = False
        else:
            ids += [*tokenizer.encode(message.text).ids, tokenizer.token_to_id(EOT)]
    return ids


class Detokenizer:
    """Tokens in, text out as it becomes final: never half a UTF-8 character, and never text that
    might be the start of a stop string. `done` once a stop string has matched (the text ends
    before it)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.stream, self.stop = TextStream(tokenizer), [s for s in stop if s]
        self.text, self.sent, self.done = "", 0, False

    def add(self, token: int) -> str:
        self.text += self.stream.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.done:
            self.text += self.stream.rest()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.done:
            return ""
        ends = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if ends:
            self.text, self.done = self.text[:min(ends)], True
        ready = len(self.text)
        if not (final or self.done):  # hold back a tail that a stop string could still begin with
            ready -= max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        new, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return new


# ---- the app ---------------------------------------------------------------------------------

def create_app(model, tokenizer: Tokenizer, name: str, slots: int = 16, max_queue: int = 256,
               static: bool = False, kv_int8: bool = False, step_tokens: int = 512, decode_step=None) -> FastAPI:
    """The app over an engine of `slots`; `decode_step` (`compile_decode_step(model)`) is built
    here, before the first request, not while a client waits."""
    cfg = model.cfg
    engine = Engine(model, slots, static=static, kv_int8=kv_int8, step_tokens=step_tokens, decode_step=decode_step)
    if decode_step is not None:
        log.info("decode steps of up to %d rows compiled in %.0f s", engine.compiled_rows, engine.warm_up())
    metrics = ServerMetrics(cfg, slots)
    loop = EngineLoop(engine, max_queue, metrics)
    eot, user = tokenizer.token_to_id(EOT), tokenizer.token_to_id(USER)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.stop()  # uvicorn has already waited for the requests in flight: this ends the thread

    app = FastAPI(title="moe", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(EngineFailed)
    async def engine_failed(request: Request, e: EngineFailed):
        return APIError(str(e), status=500, kind="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        if error["type"] == "json_invalid":
            return APIError(f"the body is not valid JSON: {error['msg']}").response()
        return APIError(f"{where}: {error['msg']}" if where else error["msg"], where or None).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": len(engine.running), "accepted": loop.accepted}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "moe"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = completion_prompt(body, tokenizer, cfg.vocab_size)
        return await serve(body, request, prompt, (eot,), "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        return await serve(body, request, chat_prompt(body.messages, tokenizer), (eot, user), "chat.completion",
                           "chatcmpl")

    async def serve(body: _Sampling, request: Request, prompt: list[int], stop_tokens: tuple[int, ...],
                    kind: str, prefix: str):
        if body.model != name:
            raise APIError(f"the model {body.model!r} does not exist here: this server serves {name!r}", "model",
                           "model_not_found")
        if unsupported := body.unsupported():
            raise APIError(f"{unsupported[0]}={getattr(body, unsupported[0])!r} is not supported by this server",
                           unsupported[0], "unsupported")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(max_new_tokens=body.max_tokens or cfg.max_seq_len, temperature=body.temperature,
                                top_p=body.top_p, stop_tokens=() if body.ignore_eos else stop_tokens, seed=body.seed)
        if not prompt:
            raise APIError("the prompt is empty", "prompt")
        if len(prompt) >= cfg.max_seq_len:
            raise APIError(f"the prompt has {len(prompt)} tokens and the model's context is {cfg.max_seq_len}: it "
                           f"must leave room for at least one new token", "prompt", "context_length_exceeded")
        try:
            ticket = loop.submit(EngineRequest(prompt, params))
        except QueueFull as e:
            error = APIError(str(e), code="rate_limit_exceeded", status=429, kind="rate_limit_error")
            return error.response({"Retry-After": str(e.retry_after_s)})
        text = Detokenizer(tokenizer, stop)
        reply = Reply(kind, f"{prefix}-{uuid.uuid4().hex}", name, len(prompt), text)
        pieces = generated(ticket, text, loop)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.events(pieces, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await until_disconnected(request, reply.whole(pieces))

    return app


async def generated(ticket: Ticket, text: Detokenizer, loop: EngineLoop) -> AsyncIterator[tuple[str, str | None]]:
    """(new text, finish reason or None) as the engine produces tokens. Leaving early (the client
    went away) or a stop string cancels the request in the engine."""
    try:
        while True:
            item = await ticket.events.get()
            if isinstance(item, EngineFailed):
                raise item
            piece = text.add(item.token)
            if text.done:
                loop.cancel(ticket)
                yield piece, "stop"
                return
            if item.finish:
                yield piece + text.finish(), item.finish
                return
            if piece:
                yield piece, None
    finally:
        loop.cancel(ticket)  # nothing if it had ended


class Reply:
    """One response's ids and counts, written whole or as server-sent events."""

    def __init__(self, kind: str, id: str, model: str, prompt_tokens: int, text: Detokenizer):
        self.kind, self.id, self.model, self.prompt_tokens, self.text = kind, id, model, prompt_tokens, text
        self.created, self.chat = int(time.time()), kind == "chat.completion"

    def usage(self) -> dict:
        completion = len(self.text.stream.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _body(self, kind: str, choices: list[dict], **more) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **more}

    def _choice(self, text: str, finish: str | None, delta: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key, message = ("delta", {"content": text}) if delta else ("message", {"role": "assistant", "content": text})
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}

    async def whole(self, pieces: AsyncIterator) -> JSONResponse:
        text, finish = [], None
        async for piece, finish in pieces:
            text.append(piece)
        return JSONResponse(self._body(self.kind, [self._choice("".join(text), finish)], usage=self.usage()))

    async def events(self, pieces: AsyncIterator, usage: bool) -> AsyncIterator[str]:
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        if self.chat:  # the role comes first, as OpenAI's streams begin
            yield sse(self._body(kind, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
        try:
            async for piece, finish in pieces:
                yield sse(self._body(kind, [self._choice(piece, finish, delta=True)]))
        except EngineFailed as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        if usage:
            yield sse(self._body(kind, [], usage=self.usage()))
        yield "data: [DONE]\n\n"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def until_disconnected(request: Request, work) -> Any:
    """`work`'s result, or, if the client disconnects first, `work` cancelled (which cancels its
    request in the engine) and an empty 499 response nobody reads."""
    result = PlainTextResponse("client closed the request", status_code=499)

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def run(scope: anyio.CancelScope) -> None:
        nonlocal result
        result = await work
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        group.start_soon(run, group.cancel_scope)
    return result

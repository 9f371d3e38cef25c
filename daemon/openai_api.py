"""The OpenAI-compatible surface: /v1/completions, /v1/chat/completions, /v1/models.

Fields the engine honours are accepted; any other field is refused with a 400 in OpenAI's error format
rather than silently ignored (`user` is metadata and accepted). Streaming is server-sent events ending
with `data: [DONE]`; a client that goes away mid-stream aborts its request, freeing its sequence.

Every request that passes validation is timed and, when it ends, handed to the `RequestLog` (the
`requests` table, the latency histograms, goodput); optd.daemon.request_log says which are recorded
and how they are timed.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from optd.daemon.request_log import RequestLog, RequestTimer
from optd.engine import Delta, Engine, EngineError, Knobs, SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    user: str | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=stop)


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


async def parse_body(request: Request, schema: type[BaseModel],
                     unknown_field: str = "is not supported") -> BaseModel | JSONResponse:
    """The request's JSON body validated against `schema`, or a 400 naming the offending field."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error(400, f"request body is not valid JSON: {e}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        why = unknown_field if first["type"] == "extra_forbidden" else first["msg"]
        return error(400, f"{param}: {why}" if param else why, param=param)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends. When the client goes away while the body is
    being sent, Starlette abandons the iterator where it is; closing it here runs its `finally` (abort
    the engine request, record it) now rather than whenever the garbage collector gets to it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIRoutes:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int, default_max_tokens: int = 256,
                 requests: RequestLog | None = None):
        self.engine, self.model_name = engine, model_name
        self.max_waiting, self.default_max_tokens = max_waiting, default_max_tokens
        self.requests = requests if requests is not None else RequestLog()
        self.created = int(time.time())
        self.router = APIRouter()
        self.router.add_api_route("/v1/models", self.models, methods=["GET"])
        self.router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.router.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])

    async def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "optd"}
        return {"object": "list", "data": [card]}

    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest, chat=False)

    async def chat(self, request: Request):
        return await self._handle(request, ChatRequest, chat=True)

    async def _handle(self, request: Request, schema: type[_Common], chat: bool):
        timer = RequestTimer("chat" if chat else "completions")    # arrival: before the body is read
        req = await parse_body(request, schema)
        if isinstance(req, JSONResponse):
            return req
        if req.model != self.model_name:
            return error(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                         param="model", kind="not_found_error")
        timer.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        timer.streamed = req.stream
        if self.engine.stats().requests_waiting >= self.max_waiting:
            message = "too many requests waiting; retry shortly"
            self._reject(timer, message)
            return error(429, message, kind="rate_limit_error", headers={"Retry-After": "1"})
        params = req.sampling(self.default_max_tokens)
        if chat and req.max_completion_tokens is not None:
            params.max_tokens = req.max_completion_tokens
        try:
            prompt = (self.engine.tokenizer.apply_chat_template([m.model_dump() for m in req.messages])
                      if chat else req.prompt)
            sequence = self.engine.make_sequence(prompt, params, timer.request_id)
        except EngineError as e:
            self._reject(timer, str(e))
            return error(400, str(e))
        timer.prompt_tokens = sequence.prompt_len
        stream = self.engine.submit_sequence(sequence)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _ClosingStreamingResponse(self._sse(stream, timer, chat, usage),
                                             media_type="text/event-stream")
        return await self._complete(stream, timer, chat)

    def _knobs(self) -> dict:
        knobs = self.engine.knobs
        return {name: getattr(knobs, name) for name in Knobs.names()}

    def _reject(self, timer: RequestTimer, message: str) -> None:
        self.requests.record(timer.finish("rejected", None, knobs=self._knobs(), error=message))

    def _finish(self, timer: RequestTimer, last: Delta | None, failure: BaseException | None = None) -> None:
        """Record a request that ran: by its final delta; as failed when handling it raised `failure`;
        else (no final delta: the client left, or the server cancelled it) as aborted."""
        if failure is not None and not isinstance(failure, asyncio.CancelledError | GeneratorExit):
            record = timer.finish("error", "error", knobs=self._knobs(),
                                  error=f"{type(failure).__name__}: {failure}")
        elif last is None or last.finish_reason is None or last.finish_reason == "abort":
            record = timer.finish("aborted", "abort", knobs=self._knobs())
        else:
            record = timer.finish("error" if last.error else "ok", last.finish_reason, knobs=self._knobs(),
                                  completion_tokens=last.completion_tokens, error=last.error)
        self.requests.record(record)

    async def _complete(self, stream: AsyncIterator[Delta], timer: RequestTimer, chat: bool) -> dict:
        text, last = [], None
        try:
            async for delta in stream:
                timer.on_delta(delta)
                text.append(delta.text)
                last = delta
        except BaseException as e:  # cancelled (the server stopping): aborted; anything else: an error
            self._finish(timer, last, e)
            raise
        self._finish(timer, last)
        if last.error:
            return error(500, f"generation failed: {last.error}", kind="server_error")
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}}
                  if chat else {"index": 0, "text": content, "logprobs": None})
        return {
            "id": timer.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name,
            "choices": [{**choice, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    async def _sse(self, stream: AsyncIterator[Delta], timer: RequestTimer, chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": timer.request_id, "object": kind, "created": int(time.time()), "model": self.model_name}
        first, last, recorded, failure = True, None, False, None
        try:
            async for delta in stream:
                timer.on_delta(delta)
                last = delta
                if delta.finish_reason is not None:
                    # Recorded when the engine is done, before the last bytes go out: a client that
                    # leaves now got its whole answer.
                    self._finish(timer, delta)
                    recorded = True
                if chat:
                    piece = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
                    choice = {"index": 0, "delta": piece}
                else:
                    choice = {"index": 0, "text": delta.text, "logprobs": None}
                first = False
                chunk = {**head, "choices": [{**choice, "finish_reason": delta.finish_reason}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if usage and last is not None:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(last)})}\n\n"
            yield "data: [DONE]\n\n"
        except BaseException as e:
            failure = e
            raise
        finally:
            if not recorded:      # the client went away (or the server is stopping) mid-stream, or a fault
                self._finish(timer, last, failure)
            await stream.aclose()  # aborts the engine request unless it finished


def _usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}

"""The OpenAI-compatible surface: /v1/completions, /v1/chat/completions, /v1/models.

Fields the engine honours are accepted; any other field is refused with a 400 in OpenAI's error format
rather than silently ignored (`user` is metadata and accepted). Streaming is server-sent events ending
with `data: [DONE]`; a client that goes away mid-stream aborts its request, freeing its sequence.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optd.engine import Delta, Engine, EngineError, SamplingParams


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


class OpenAIRoutes:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int, default_max_tokens: int = 256):
        self.engine, self.model_name = engine, model_name
        self.max_waiting, self.default_max_tokens = max_waiting, default_max_tokens
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
        req = await parse_body(request, schema)
        if isinstance(req, JSONResponse):
            return req
        if req.model != self.model_name:
            return error(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                         param="model", kind="not_found_error")
        if self.engine.stats().requests_waiting >= self.max_waiting:
            return error(429, "too many requests waiting; retry shortly", kind="rate_limit_error",
                         headers={"Retry-After": "1"})
        params = req.sampling(self.default_max_tokens)
        if chat and req.max_completion_tokens is not None:
            params.max_tokens = req.max_completion_tokens
        try:
            prompt = (self.engine.tokenizer.apply_chat_template([m.model_dump() for m in req.messages])
                      if chat else req.prompt)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            sequence = self.engine.make_sequence(prompt, params, request_id)
        except EngineError as e:
            return error(400, str(e))
        stream = self.engine.submit_sequence(sequence)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._sse(stream, sequence.request_id, chat, usage),
                                     media_type="text/event-stream")
        return await self._complete(stream, sequence.request_id, chat)

    async def _complete(self, stream: AsyncIterator[Delta], request_id: str, chat: bool) -> dict:
        text, last = [], None
        async for delta in stream:
            text.append(delta.text)
            last = delta
        if last.error:
            return error(500, f"generation failed: {last.error}", kind="server_error")
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}}
                  if chat else {"index": 0, "text": content, "logprobs": None})
        return {
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name,
            "choices": [{**choice, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    async def _sse(self, stream: AsyncIterator[Delta], request_id: str, chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": request_id, "object": kind, "created": int(time.time()), "model": self.model_name}
        first, last = True, None
        async for delta in stream:
            last = delta
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


def _usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}

"""OpenAI-compatible HTTP front of the gateway: Starlette on uvicorn, in the gateway's event loop.

`POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` as server-sent
events ending in `data: [DONE]`), `GET /v1/models` and `GET /health`. A request becomes the same
GenerateRequest the gRPC front takes and goes through the same validation, admission control,
routing, metrics and bearer token; errors use OpenAI's JSON shape with the matching HTTP status
(400 naming the field, 401, 404 unknown model, 429 queue full, 503 no replica).

`n` > 1 runs n samples of the prompt (the gateway's serve_samples: seed + i when seeded; they
share the prompt's cached K/V blocks). Structured output comes from `response_format` or
vLLM's guided_* fields. `echo`, `suffix`, `logit_bias` and several prompts per request are
refused with a 400 that names the field. vLLM's extensions top_k, min_p, repetition_penalty,
ignore_eos and beam search (`use_beam_search`: the n best of n beams; or `beam_width`, with
`length_penalty` and `early_stopping`) are accepted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from typing import Any, AsyncIterator

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemma_dist.engine.llm_engine import RequestDelta
from gemma_dist.engine.sequence import FinishReason
from gemma_dist.server.gateway import GemmaServicer, ServeError
from gemma_dist.structured import CONSTRAINT_FIELDS, ConstraintError, grammar_of
from gemma_dist.v1 import gemma_pb2

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 << 20  # as the gRPC front's message limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed call checks that its client is still there
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
           grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
           grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error", 500: "server_error"}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORTED: "abort"}
# Proto field paths (the shared validation names them) → the OpenAI request's names.
_FIELD_NAMES = (("sampling.max_tokens", "max_tokens"), ("sampling.", ""), ("prompt_token_ids.ids", "prompt"),
                ("chat.messages", "messages"), ("chat", "messages"))


class HttpError(Exception):
    """An OpenAI-shaped error: HTTP status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    @classmethod
    def invalid(cls, field: str, message: str) -> "HttpError":
        """A 400 naming `field`."""
        return cls(400, f"{field}: {message}", field)

    @classmethod
    def of(cls, error: ServeError) -> "HttpError":
        """The HTTP form of a gateway error (field paths renamed to the OpenAI request's)."""
        message, param = error.message, None
        if error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and ": " in message:
            field, rest = message.split(": ", 1)
            param = next((field.replace(old, new, 1) for old, new in _FIELD_NAMES if field.startswith(old)), field)
            message = f"{param}: {rest}"
        return cls(_STATUS.get(error.code, 500), message, param)

    def body(self) -> dict:
        """OpenAI's error object (a response's body, or a stream's error event)."""
        return {"error": {"message": self.message, "type": _ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        """The error as OpenAI returns it."""
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------------------- request → proto


def _typed(body: dict, field: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[field] when present and of one of `kinds` (bool is not a number here), else None."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise HttpError.invalid(field, f"must be {what}, got {json.dumps(value)[:80]}")
    return value


def _sampling(body: dict, chat: bool) -> gemma_pb2.SamplingParams:
    """The OpenAI sampling fields as the proto's (range checks are the shared validation's)."""
    sampling = gemma_pb2.SamplingParams()
    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer") if chat else None
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", (int,), "an integer")
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    # OpenAI's numbers, then the extensions vLLM's OpenAI server also takes (min_p, repetition_penalty).
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        value = _typed(body, name, (int, float), "a number")
        if value is not None:
            setattr(sampling, name, float(value))
    for name in ("seed", "top_k"):  # top_k: vLLM's extension
        value = _typed(body, name, (int,), "an integer")
        if value is not None:
            setattr(sampling, name, value)
    sampling.ignore_eos = bool(_typed(body, "ignore_eos", (bool,), "true or false"))
    stop = body.get("stop")
    if isinstance(stop, str):
        sampling.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        sampling.stop.extend(stop)
    elif stop is not None:
        raise HttpError.invalid("stop", "must be a string or a list of strings")
    if chat:
        wanted = _typed(body, "logprobs", (bool,), "true or false")
        top = _typed(body, "top_logprobs", (int,), "an integer")
        if top is not None and not wanted:
            raise HttpError.invalid("top_logprobs", "needs logprobs: true")
        if wanted:
            sampling.logprobs = max(1, top or 0)  # the chosen token's logprob comes with >= 1 alternative
    else:
        top = _typed(body, "logprobs", (int,), "an integer")
        if top:
            sampling.logprobs = top
    _constraint_into(sampling, body)
    return sampling


def _constraint_into(sampling: gemma_pb2.SamplingParams, body: dict) -> None:
    """Structured output: OpenAI's response_format (json_object, json_schema), or vLLM's
    guided_json / guided_regex / guided_choice; compiled here, so a 400 names the field sent."""
    given = []
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            given.append(("response_format", "json_schema", '{"type": "object"}'))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise HttpError.invalid("response_format", "json_schema needs a 'schema' object")
            given.append(("response_format", "json_schema", json.dumps(schema)))
        elif kind != "text":
            raise HttpError.invalid("response_format", f"type {kind!r} is not supported "
                                                       "(text, json_object or json_schema)")
    guided_json = body.get("guided_json")
    if guided_json is not None:
        given.append(("guided_json", "json_schema", guided_json if isinstance(guided_json, str) else
                      json.dumps(guided_json)))
    if body.get("guided_regex") is not None:
        given.append(("guided_regex", "regex", _typed(body, "guided_regex", (str,), "a string")))
    if body.get("guided_choice") is not None:
        choice = body["guided_choice"]
        if not isinstance(choice, list) or not all(isinstance(c, str) for c in choice):
            raise HttpError.invalid("guided_choice", "must be a list of strings")
        given.append(("guided_choice", "choice", choice))
    if not given:
        return
    if len(given) > 1:
        raise HttpError.invalid(given[1][0], f"cannot be combined with {given[0][0]}: give one constraint")
    field, name, value = given[0]
    try:
        grammar_of(**{key: value if key == name else None for key in CONSTRAINT_FIELDS})
    except ConstraintError as e:
        raise HttpError.invalid(field, str(e)) from None
    if name == "choice":
        sampling.choice.extend(value)
    else:
        setattr(sampling, name, value)


def _refuse_unsupported(body: dict) -> None:
    """400 for OpenAI fields this server does not implement (rather than ignoring them)."""
    for field, harmless in (("echo", False), ("suffix", None), ("logit_bias", None)):
        if body.get(field) not in (harmless, None, {}):
            raise HttpError.invalid(field, "is not supported by this server")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise HttpError.invalid("best_of", "is not supported (use n)")


def _prompt_into(request: gemma_pb2.GenerateRequest, prompt: Any) -> None:
    """A completions prompt: text, token ids, or a one-element list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.prompt_token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise HttpError.invalid("prompt", "one prompt per request (send several requests, or use n for samples)")
    else:
        raise HttpError.invalid("prompt", "must be a non-empty string or a list of token ids")


def _messages_into(request: gemma_pb2.GenerateRequest, messages: Any) -> None:
    """Chat messages: role and content (a string, or a list of text parts)."""
    if not isinstance(messages, list) or not messages:
        raise HttpError.invalid("messages", "must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError.invalid(f"messages[{i}]", "must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise HttpError.invalid(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise HttpError.invalid(f"messages[{i}].content", "must be a string or a list of text parts")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for it
        request.chat.messages.append(gemma_pb2.ChatMessage(role=role, content=content))


def to_generate_request(body: Any, chat: bool) -> gemma_pb2.GenerateRequest:
    """An OpenAI request body → the gRPC front's GenerateRequest; HttpError naming the field."""
    if not isinstance(body, dict):
        raise HttpError.invalid("body", "must be a JSON object")
    _refuse_unsupported(body)
    request = gemma_pb2.GenerateRequest(model=_typed(body, "model", (str,), "a string") or "")
    if chat:
        _messages_into(request, body.get("messages"))
    else:
        _prompt_into(request, body.get("prompt"))
    request.sampling.CopyFrom(_sampling(body, chat))
    n = _typed(body, "n", (int,), "an integer")
    if n is not None:
        request.sampling.n = n  # range-checked by the shared validation
    _beam_search_into(request.sampling, body, n)
    return request


def _beam_search_into(sampling: gemma_pb2.SamplingParams, body: dict, n: int | None) -> None:
    """Beam search, vLLM's way (use_beam_search: the n best of n beams) or ours (beam_width), with
    length_penalty and early_stopping."""
    width = _typed(body, "beam_width", (int,), "an integer")
    if width is None and _typed(body, "use_beam_search", (bool,), "true or false"):
        width = n or 1
    if width is not None:
        sampling.beam_width = width
    length_penalty = _typed(body, "length_penalty", (int, float), "a number")
    if length_penalty is not None:
        sampling.length_penalty = float(length_penalty)
    sampling.early_stopping = bool(_typed(body, "early_stopping", (bool,), "true or false"))


# ---------------------------------------------------------------------------------- the front


class OpenAIFront:
    """The HTTP routes over a GemmaServicer (its replicas, router, limits and metrics)."""

    def __init__(self, servicer: GemmaServicer, auth_token: str | None = None):
        self.servicer = servicer
        self.auth_token = auth_token  # every /v1 call must send it as a bearer token (None: open)
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    async def health(self, request: Request) -> Response:
        """200 while a replica is ready, else 503 (open without the token, as gRPC health is)."""
        ready = any(r.is_ready() for r in self.servicer.replicas)
        return JSONResponse({"status": "ok" if ready else "no replica is ready"}, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        """The served model."""
        if (denied := self._denied(request)) is not None:
            return denied
        served = self.servicer.served
        return JSONResponse({"object": "list", "data": [{
            "id": served.name, "object": "model", "created": 0, "owned_by": "gemma_dist",
            "max_model_len": served.max_context}]})

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions (the tokenizer's Gemma chat template)."""
        return await self._generate(request, chat=True)

    def _denied(self, request: Request) -> Response | None:
        if self.auth_token is None:
            return None
        sent = request.headers.get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {self.auth_token}".encode()):
            return None
        return HttpError(401, "missing or wrong bearer token").response()

    async def _generate(self, request: Request, chat: bool) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        method = "CreateChatCompletion" if chat else "CreateCompletion"
        try:
            body = await self._body(request)
            proto = to_generate_request(body, chat)
        except HttpError as e:
            self.servicer.metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
            return e.response()
        stream = body.get("stream") is True
        include_usage = stream and isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        pairs = self.servicer.measured(self._deltas(proto), method, _code_of)
        reply = Reply(self.servicer, chat, proto.sampling.n or 1, logprobs=proto.sampling.logprobs > 0,
                      top_logprobs=body.get("top_logprobs") if chat else proto.sampling.logprobs)
        try:
            first = await anext(pairs)  # errors before the first token get their HTTP status
        except ServeError as e:
            return HttpError.of(e).response()
        except StopAsyncIteration:
            first = None
        if stream:
            return StreamingResponse(reply.events(first, pairs, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect() -> None:
            try:
                if first is not None:
                    reply.add(*first)
                async for delta, index in pairs:
                    reply.add(delta, index)
            finally:
                await pairs.aclose()

        task = asyncio.ensure_future(collect())
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS))[0]:
                if await request.is_disconnected():  # nobody to answer: stop the requests in their replicas
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return Response(status_code=499)  # never sent: the client is gone
            task.result()
        except ServeError as e:
            return HttpError.of(e).response()
        finally:
            task.cancel()  # (a no-op once done) the handler itself was cancelled: so are its requests
        return JSONResponse(reply.whole())

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"request body: over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError.invalid("body", f"not valid JSON ({e})") from None

    async def _deltas(self, proto: gemma_pb2.GenerateRequest) -> AsyncIterator[tuple[RequestDelta, int]]:
        """(delta, sample index) of the request's samples (ServeError when it cannot be served)."""
        async for item in self.servicer.serve_samples(self.servicer.check(proto), None):
            yield item


def _code_of(error: BaseException) -> str:
    """The metrics' status label of an HTTP call that ended with `error`."""
    if isinstance(error, ServeError):
        return error.code.name
    return "CANCELLED" if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else "UNKNOWN"


class Reply:
    """Builds a completion (or its stream of chunks) from the samples' deltas."""

    def __init__(self, servicer: GemmaServicer, chat: bool, n: int, logprobs: bool, top_logprobs: int | None):
        self.tokenizer = servicer.tokenizer
        self.model = servicer.served.name
        self.chat = chat
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs or 0
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.token_logprobs: list[list] = [[] for _ in range(n)]
        self.prompt_tokens = 0
        self.completion_tokens = [0] * n

    def add(self, delta: RequestDelta, i: int) -> None:
        """Account one delta of choice `i`."""
        self.texts[i] += delta.text
        self.token_logprobs[i] += delta.logprobs
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens[i] = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish[i] = _FINISH[delta.finish_reason]

    def usage(self) -> dict:
        """OpenAI's usage object, over every choice."""
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self) -> dict:
        """The non-streaming response."""
        choices = []
        for i, text in enumerate(self.texts):
            logprobs = self._logprobs(self.token_logprobs[i]) if self.logprobs else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    async def events(self, first, pairs, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, [DONE] last; an error mid-stream is sent as an
        error event before [DONE]."""
        try:
            if self.chat:  # the role comes first, as OpenAI sends it
                for i in range(len(self.texts)):
                    yield _event(self._chunk(i, {"role": "assistant", "content": ""}, None, None))
            if first is not None:
                yield self._delta_event(*first)
            async for delta, index in pairs:
                yield self._delta_event(delta, index)
            if include_usage:
                yield _event({"id": self.id, "object": self._chunk_object(), "created": self.created,
                              "model": self.model, "choices": [], "usage": self.usage()})
        except ServeError as e:
            yield _event(HttpError.of(e).body())
        finally:
            await pairs.aclose()  # a client that went away aborts its requests in their replicas
        yield "data: [DONE]\n\n"

    def _delta_event(self, delta: RequestDelta, index: int) -> str:
        self.add(delta, index)
        logprobs = self._logprobs(delta.logprobs) if self.logprobs else None
        content = {"content": delta.text} if self.chat else delta.text
        return _event(self._chunk(index, content, logprobs, self.finish[index]))

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, content, logprobs, finish: str | None) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        choice["delta" if self.chat else "text"] = content
        return {"id": self.id, "object": self._chunk_object(), "created": self.created, "model": self.model,
                "choices": [choice]}

    def _logprobs(self, token_logprobs: list) -> dict:
        """OpenAI's logprobs object: chat's `content` list, or the legacy completions arrays."""
        piece = self._piece
        if self.chat:
            return {"content": [{"token": piece(lp.token_id), "logprob": lp.logprob,
                                 "bytes": list(piece(lp.token_id).encode()),
                                 "top_logprobs": [{"token": piece(t), "logprob": p, "bytes": list(piece(t).encode())}
                                                  for t, p in lp.top[:self.top_logprobs]]}
                                for lp in token_logprobs]}
        tokens = [piece(lp.token_id) for lp in token_logprobs]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in token_logprobs],
                "top_logprobs": [{piece(t): p for t, p in lp.top[:self.top_logprobs]} for lp in token_logprobs],
                "text_offset": offsets}

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------- server


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's process owns SIGINT/SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # uvicorn >= 0.29
        import contextlib

        return contextlib.nullcontext()


class HttpServer:
    """The OpenAI front served by uvicorn on the running event loop."""

    def __init__(self, server: _Server, task: asyncio.Task, port: int):
        self.server, self.task, self.port = server, task, port

    async def stop(self) -> None:
        """Stop accepting, finish open responses, close."""
        self.server.should_exit = True
        await self.task


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The HTTP front's listening socket, bound now (a taken port fails before any model loads)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"--http-port: cannot bind {host}:{port} ({e.strerror})") from e
    return sock


async def start_http(servicer: GemmaServicer, host: str, port: int, auth_token: str | None = None,
                     ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                     sock: socket.socket | None = None) -> HttpServer:
    """Serve the OpenAI front on host:port (0: a free port), or on an already bound `sock`, from this
    event loop; returns once it listens."""
    front = OpenAIFront(servicer, auth_token)
    sock = sock or bind_http_socket(host, port)
    config = uvicorn.Config(front.app, log_level="warning", access_log=False, lifespan="off",
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=30)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{port} stopped at once")
        await asyncio.sleep(0.01)
    return HttpServer(server, task, sock.getsockname()[1])

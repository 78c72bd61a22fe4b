"""Python client of a gemma_dist server (gRPC): `Client("127.0.0.1:50051").generate("...")`."""

from __future__ import annotations

import json
from typing import Iterator, Sequence

import grpc

import gemma_dist.server  # noqa: F401  (generates the stubs in a fresh checkout)
from gemma_dist.v1 import gemma_pb2, gemma_pb2_grpc

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "stop_token_ids", "seed",
                    "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "ignore_eos", "n",
                    "json_schema", "regex", "choice", "beam_width", "length_penalty", "early_stopping")


SERVICE = gemma_pb2.DESCRIPTOR.services_by_name["GemmaService"].full_name
MAX_RETRIES = 4  # gRPC caps a retry policy at 5 attempts


def retry_service_config(retries: int, backoff: float) -> str:
    """A gRPC service config that retries GemmaService calls ending UNAVAILABLE before any response
    arrived (gRPC commits a call once a response comes, and never retries it after), up to
    `retries` more attempts with exponential backoff from `backoff` seconds (with jitter), within a
    channel-wide budget: retries stop while more than half of a 10-token bucket is spent (a failure
    costs 1 token, a success gives 0.1 back), so a server that is down is not hammered."""
    return json.dumps({
        "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": {
            "maxAttempts": retries + 1, "initialBackoff": f"{backoff:g}s", "maxBackoff": f"{max(backoff, 5.0):g}s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}})


class Client:
    """A blocking client; `generate` returns the whole completion, `generate_stream` its pieces.

    Calls that end UNAVAILABLE before receiving anything (no replica ready, the queue timeout, a
    replica that failed, the server restarting) are retried `retries` times (0..4) with backoff;
    a stream that already received a piece is never retried (see retry_service_config)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 retries: int = 2, retry_backoff: float = 0.25):
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"retries must be in [0, {MAX_RETRIES}], got {retries}")
        options = [("grpc.enable_retries", int(retries > 0))]
        if retries:
            options.append(("grpc.service_config", retry_service_config(retries, retry_backoff)))
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = gemma_pb2_grpc.GemmaServiceStub(self.channel)
        self.admin = gemma_pb2_grpc.AdminServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def generate(self, prompt: str | Sequence[int] | None = None, *, chat: Sequence[dict] | None = None,
                 request_id: str = "", model: str = "", **sampling) -> gemma_pb2.GenerateResponse:
        """The whole completion (`.text`, `.token_ids`, `.finish_reason`, `.usage`)."""
        return self.stub.Generate(make_request(prompt, chat, request_id, model, **sampling),
                                  timeout=self.timeout, metadata=self.metadata)

    def generate_stream(self, prompt: str | Sequence[int] | None = None, *, chat: Sequence[dict] | None = None,
                        request_id: str = "", model: str = "", **sampling) -> Iterator[gemma_pb2.GenerateResponse]:
        """The completion piece by piece, as the server produces it."""
        return self.stub.GenerateStream(make_request(prompt, chat, request_id, model, **sampling),
                                        timeout=self.timeout, metadata=self.metadata)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` under the served model's tokenizer."""
        return list(self.stub.Tokenize(gemma_pb2.TokenizeRequest(text=text, add_bos=add_bos),
                                       timeout=self.timeout, metadata=self.metadata).token_ids)

    def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Stop requests in flight by id; returns the ids that were in flight."""
        return list(self.stub.Abort(gemma_pb2.AbortRequest(request_ids=list(request_ids)),
                                    timeout=self.timeout, metadata=self.metadata).aborted)

    def model_info(self) -> gemma_pb2.ModelInfo:
        """What the server serves."""
        return self.stub.GetModelInfo(gemma_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def scale(self, replicas: int) -> int:
        """Ask the server to run `replicas` replicas; returns how many it runs once done."""
        return self.admin.Scale(gemma_pb2.ScaleRequest(replicas=replicas), timeout=self.timeout,
                                metadata=self.metadata).replicas

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_request(prompt=None, chat=None, request_id: str = "", model: str = "", **sampling) -> gemma_pb2.GenerateRequest:
    """A GenerateRequest from Python values (sampling keywords as in SamplingParams)."""
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    request = gemma_pb2.GenerateRequest(request_id=request_id, model=model,
                                        sampling=gemma_pb2.SamplingParams(**{k: v for k, v in sampling.items()
                                                                              if v is not None}))
    if chat is not None:
        request.chat.SetInParent()  # an empty chat is still "chat" (and rejected as empty)
        request.chat.messages.extend(gemma_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
    elif isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.SetInParent()
        request.prompt_token_ids.ids.extend(int(t) for t in prompt)
    return request

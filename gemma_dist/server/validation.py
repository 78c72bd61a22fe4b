"""Request validation at the gateway: proto message → checked engine inputs, or an error that
names the field. Nothing reaches a replica unless it passes here."""

from __future__ import annotations

import dataclasses
from typing import Any

from gemma_dist.sampling import SamplingParams, SamplingParamsError
from gemma_dist.v1 import gemma_pb2

MAX_REQUEST_ID_CHARS = 128
MAX_SAMPLES = 16  # sampling.n
CHAT_ROLES = ("system", "user", "model", "assistant")
# Proto field name → SamplingParams field, where they differ.
_DEFAULTS = SamplingParams()


class ValidationError(ValueError):
    """A request field is invalid; `field` is its path, e.g. "sampling.top_p"."""

    def __init__(self, field: str, message: str, not_found: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.not_found = not_found  # NOT_FOUND rather than INVALID_ARGUMENT (unknown model)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the gateway checks requests against."""

    name: str  # the name requests may give in `model`
    vocab_size: int
    max_context: int
    max_tokens_limit: int  # the server's cap on max_tokens


@dataclasses.dataclass
class CheckedRequest:
    """A validated GenerateRequest, ready for a replica."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None  # given by the request, or the gateway's tokenization
    chat: list[dict[str, str]] | None = None
    params: SamplingParams = _DEFAULTS
    n: int = 1  # samples of the prompt (sampling.n)
    fork_of: str | None = None  # a sample of n > 1: the id of the sample whose K/V it may start from

    @property
    def tokenized(self) -> bool:
        """True when prompt_token_ids were made here from `prompt` or `chat` (see `tokenize`)."""
        return self.prompt_token_ids is not None and (self.prompt is not None or self.chat is not None)

    def tokenize(self, tokenizer) -> list[int]:
        """Token ids of the input, made once here and sent on (the replica does not tokenize again)."""
        if self.prompt_token_ids is None:
            self.prompt_token_ids = (tokenizer.encode_chat(self.chat) if self.chat is not None
                                     else tokenizer.encode(self.prompt))
        return self.prompt_token_ids

    def engine_input(self) -> dict[str, Any]:
        """Keyword arguments for LLMEngine.add_request / AsyncLLMEngine.generate: the token ids,
        with the text they came from and whether they are a rendered chat (it stops at
        <end_of_turn>), when the gateway tokenized them."""
        fork = {"fork_of": self.fork_of} if self.fork_of is not None else {}
        if not self.tokenized:
            if self.chat is not None:
                return {"chat": self.chat, **fork}
            return {"prompt": self.prompt if self.prompt is not None else self.prompt_token_ids, **fork}
        return {"prompt": self.prompt_token_ids, "prompt_text": self.prompt, "chat_template": self.chat is not None,
                **fork}


def check_model(name: str, served: ServedModel, field: str = "model") -> None:
    """Empty or the served name; anything else is NOT_FOUND."""
    if name and name != served.name:
        raise ValidationError(field, f"unknown model {name!r}; this server serves {served.name!r}", not_found=True)


def check_generate(request: gemma_pb2.GenerateRequest, served: ServedModel, assigned_id: str) -> CheckedRequest:
    """Validate a GenerateRequest (no tokenization: prompt length is checked by the replica)."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValidationError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request.request_id)}")
    check_model(request.model, served)
    checked = CheckedRequest(request_id=request.request_id or assigned_id)
    kind = request.WhichOneof("input")
    if kind is None:
        raise ValidationError("input", "give exactly one of prompt, prompt_token_ids or chat")
    if kind == "prompt":
        if not request.prompt:
            raise ValidationError("prompt", "must not be empty")
        checked.prompt = request.prompt
    elif kind == "prompt_token_ids":
        checked.prompt_token_ids = _token_ids(list(request.prompt_token_ids.ids), served)
    else:
        checked.chat = _chat(request.chat)
    checked.params = sampling_params(request.sampling, served)
    if request.sampling.HasField("n"):
        if not 1 <= request.sampling.n <= MAX_SAMPLES:
            raise ValidationError("sampling.n", f"must be in [1, {MAX_SAMPLES}], got {request.sampling.n}")
        checked.n = request.sampling.n
    if checked.params.beam_search and checked.n > checked.params.beam_width:
        raise ValidationError("sampling.n", f"must be <= beam_width ({checked.params.beam_width}) with beam search, "
                                            f"got {checked.n}")
    if checked.prompt_token_ids is not None:
        check_length(len(checked.prompt_token_ids), checked.params.max_tokens, served, "prompt_token_ids")
    return checked


def _token_ids(ids: list[int], served: ServedModel) -> list[int]:
    if not ids:
        raise ValidationError("prompt_token_ids.ids", "must not be empty")
    for i, token in enumerate(ids):
        if not 0 <= token < served.vocab_size:
            raise ValidationError(f"prompt_token_ids.ids[{i}]", f"{token} is outside the vocabulary [0, {served.vocab_size})")
    return ids


def _chat(chat: gemma_pb2.Chat) -> list[dict[str, str]]:
    if not chat.messages:
        raise ValidationError("chat.messages", "must not be empty")
    out = []
    for i, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise ValidationError(f"chat.messages[{i}].role",
                                  f"unknown role {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        out.append({"role": message.role, "content": message.content})
    return out


def check_length(prompt_tokens: int, max_tokens: int, served: ServedModel, field: str = "prompt") -> None:
    """prompt + max_tokens must fit the model's context."""
    if prompt_tokens + max_tokens > served.max_context:
        raise ValidationError(field, f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the "
                                     f"model's context of {served.max_context} tokens")


def sampling_params(proto: gemma_pb2.SamplingParams, served: ServedModel) -> SamplingParams:
    """Proto sampling fields → validated SamplingParams (unset optionals keep the defaults)."""
    values: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "beam_width", "length_penalty"):
        if proto.HasField(name):
            values[name] = getattr(proto, name)
    values["stop"] = tuple(proto.stop)
    values["stop_token_ids"] = tuple(proto.stop_token_ids)
    values["logprobs"] = proto.logprobs
    values["ignore_eos"] = proto.ignore_eos
    values["early_stopping"] = proto.early_stopping
    for name in ("json_schema", "regex"):  # structured output (compiled by SamplingParams)
        if proto.HasField(name):
            values[name] = getattr(proto, name)
    if proto.choice:
        values["choice"] = tuple(proto.choice)
    max_tokens = values.get("max_tokens", _DEFAULTS.max_tokens)
    if isinstance(max_tokens, int) and max_tokens > served.max_tokens_limit:
        raise ValidationError("sampling.max_tokens", f"must be <= {served.max_tokens_limit}, got {max_tokens}")
    for i, token in enumerate(values["stop_token_ids"]):
        if not 0 <= token < served.vocab_size:
            raise ValidationError(f"sampling.stop_token_ids[{i}]", f"{token} is outside the vocabulary")
    try:
        return SamplingParams(**values)
    except SamplingParamsError as e:  # its message starts with the parameter's name
        raise ValidationError(f"sampling.{str(e).split()[0]}", str(e).split(" ", 1)[1] if " " in str(e) else str(e)) from e

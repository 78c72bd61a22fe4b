"""Per-request state: tokens, KV blocks, text and the stop rules. Plain Python (no torch)."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gemma_dist.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a request ended."""

    STOP = "stop"  # eos, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    ABORTED = "aborted"  # cancelled by the caller


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request being generated. Compared by identity: value equality would compare whole
    token lists, and the scheduler asks `seq in ...` every step."""

    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"
    eos_token_ids: frozenset[int]  # the model's end ids (<eos>, and <end_of_turn> for chat); ignore_eos skips them
    max_context: int  # the model's context length: prompt + output never exceed it
    prompt: str | None = None  # the prompt text, when the request gave one
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Any] = dataclasses.field(default_factory=list)  # TokenLogprob per output token
    block_table: list[int] = dataclasses.field(default_factory=list)  # KV blocks, in position order
    num_cached: int = 0  # tokens whose K/V are already in the cache
    text: str = ""  # detokenized output, stop string removed
    finish_reason: FinishReason | None = None
    generator: Any = None  # per-request torch.Generator when params.seed is set
    num_preemptions: int = 0  # times its KV blocks were taken back (it then recomputes them)
    slot: int | None = None  # its row in the runners' persistent batch, while it holds one
    synced_blocks: int = 0  # block_table entries the runners already know (the rest travel next step)
    synced_tokens: int = 0  # prompt + output tokens the runners already know

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    @property
    def in_prefill(self) -> bool:
        """True while some prompt tokens have no K/V yet (their next step is a prefill chunk)."""
        return self.num_cached < len(self.prompt_token_ids)

    def uncached_token_ids(self) -> list[int]:
        """Tokens to feed next: the rest of the prompt, or the last generated token."""
        return self.all_token_ids[self.num_cached:]

    def token_ids_at(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole list."""
        prompt = len(self.prompt_token_ids)
        if start >= prompt:
            return self.output_token_ids[start - prompt: stop - prompt]
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt]


def finish_on_token(seq: Sequence, token_id: int) -> FinishReason | None:
    """Finish reason caused by the token just appended (stop id, max_tokens, or full context)."""
    if token_id in seq.params.stop_token_ids:
        return FinishReason.STOP
    if token_id in seq.eos_token_ids and not seq.params.ignore_eos:
        return FinishReason.STOP
    if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= seq.max_context:
        return FinishReason.LENGTH
    return None


def find_stop_string(text: str, new_from: int, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest stop string starts, searching only matches that end
    after `new_from` (the text before was already checked); None when there is none."""
    best = None
    for stop in stops:
        begin = max(0, new_from - len(stop) + 1)
        at = text.find(stop, begin)
        if at != -1 and (best is None or at < best):
            best = at
    return best

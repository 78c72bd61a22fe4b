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
    # Per block of positions: a KV page per layer group (block_manager.Entry).
    block_table: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    window_freed: int = 0  # leading block_table entries whose LOCAL groups' pages went back (left the window)
    num_cached: int = 0  # tokens whose K/V are already in the cache
    text: str = ""  # detokenized output, stop string removed
    finish_reason: FinishReason | None = None
    slot: int | None = None  # its row in the runners' persistent batch, while it holds one
    synced_blocks: int = 0  # block_table entries the runners already know (the rest travel next step)
    # Tokens that steps in flight are sampling: the runners append them themselves, and the next
    # step is planned on top of them before they are known here (async scheduling).
    pending_tokens: int = 0
    block_keys: list[int] = dataclasses.field(default_factory=list)  # prefix-cache keys of its first full blocks
    registered_blocks: int = 0  # leading block_table entries already offered to the prefix cache
    # Another sample of the same prompt, still running: admitted, this one shares its full blocks
    # and gets a copy of its partial one instead of computing the prompt (cleared once admitted).
    fork_of: "Sequence | None" = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, counting those still being sampled (`pending_tokens`)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus the generated tokens already known here."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def awaits_last_token(self) -> bool:
        """True while a step in flight samples the last token it may get (max_tokens or the
        context), so it must not be scheduled again."""
        return self.pending_tokens > 0 and (len(self.output_token_ids) + self.pending_tokens >= self.params.max_tokens
                                            or self.num_tokens >= self.max_context)

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



def finish_on_token(seq: Sequence, token_id: int) -> FinishReason | None:
    """Finish reason caused by the token just appended (stop id, max_tokens, or full context)."""
    if token_id in seq.params.stop_token_ids:
        return FinishReason.STOP
    if token_id in seq.eos_token_ids and not seq.params.ignore_eos:
        return FinishReason.STOP
    if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_known_tokens >= seq.max_context:
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

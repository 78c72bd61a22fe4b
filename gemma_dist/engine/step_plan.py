"""The step plan: what the engine tells its runners each step, as changes only. Plain Python.

Runners (the in-process one, or every tensor-parallel shard worker) keep a persistent batch:
per request its tokens, block table, sampling parameters and generator, in a numbered slot.
A plan then carries only what changed since the last step: requests that arrived or left,
blocks appended to a table, and which slots run how many tokens. The runners append the tokens
they sample themselves, so the engine can plan the next step before it knows them. A plan's size
grows with the number of scheduled sequences, never with their context length.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemma_dist.sampling import SamplingParams


@dataclasses.dataclass
class NewRequest:
    """A request entering the persistent batch (its first step)."""

    slot: int  # its row in the persistent batch until it finishes
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens already generated (normally none)
    params: "SamplingParams"


@dataclasses.dataclass
class StepPlan:
    """One step as changes to the runners' persistent batch, then the rows to run.

    Runners apply, in order: `removed`, `added`, `reset`, `block_updates`, `copies`; then run the rows
    (`slots[i]` computes `num_tokens[i]` tokens starting at position `num_cached[i]`, and samples
    a next token after them when `samples[i]`, which every runner appends to the slot's tokens).
    """

    added: list[NewRequest] = dataclasses.field(default_factory=list)
    removed: list[int] = dataclasses.field(default_factory=list)  # slots of finished / aborted requests
    reset: list[int] = dataclasses.field(default_factory=list)  # slots preempted: cache and table emptied
    block_updates: list[tuple[int, int, list[int]]] = dataclasses.field(default_factory=list)  # (slot, index, blocks)
    slots: list[int] = dataclasses.field(default_factory=list)  # the step's rows, in order
    num_cached: list[int] = dataclasses.field(default_factory=list)  # per row: first position computed
    num_tokens: list[int] = dataclasses.field(default_factory=list)  # per row: tokens computed
    samples: list[bool] = dataclasses.field(default_factory=list)  # per row: sample after its last token
    # KV pages to copy (source, destination) before the forward: a forked sample's partial block.
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_sampled(self) -> int:
        """Rows that sample a token."""
        return sum(self.samples)


class SlotAllocator:
    """Hands out slot numbers, reusing freed ones before new ones, so persistent-batch rows stay dense."""

    def __init__(self) -> None:
        self._free: list[int] = []  # freed slots, reused before new ones
        self._next = 0

    def take(self) -> int:
        """A slot no live request holds."""
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give_back(self, slot: int) -> None:
        """Make `slot` reusable (after the runners were told it is removed)."""
        self._free.append(slot)

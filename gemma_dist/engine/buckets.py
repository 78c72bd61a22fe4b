"""Padded step shapes for compiled backends (torch_xla), so a server compiles a bounded set of graphs.

Plain Python (no torch). A compiled backend runs every step as calls of one of two kinds:
- decode: `rows` sequences with one new token each (a lone 1-token prompt chunk counts too);
- prefill: one sequence's prompt chunk of 2+ tokens.
Each call is padded up to a bucket: rows to a power of two (at most `max_num_seqs`), chunk
tokens to a power of two from `min_chunk` (at most the step's token budget), and the KV
blocks gathered per sequence to a power of two (at most the blocks `max_model_len` needs).
`graph_shapes()` lists every padded shape a call can take; warming those up compiles
everything the server will ever run, before the first user request.
"""

from __future__ import annotations

import dataclasses
import math


def powers_of_two_up_to(limit: int, start: int = 1) -> tuple[int, ...]:
    """start, 2*start, 4*start, ... below `limit`, then `limit` itself (always included)."""
    if limit < 1 or start < 1:
        raise ValueError(f"bucket limits must be >= 1, got limit={limit}, start={start}")
    values, v = [], start
    while v < limit:
        values.append(v)
        v *= 2
    return (*values, limit)


def pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    """The smallest bucket >= n (buckets ascending)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest compiled bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class GraphShape:
    """One padded call: `rows` sequences x `query_len` new tokens, `blocks` KV blocks each."""

    rows: int
    query_len: int
    blocks: int

    @property
    def is_decode(self) -> bool:
        """One new token per row."""
        return self.query_len == 1


@dataclasses.dataclass(frozen=True)
class ShapeBuckets:
    """The padded sizes a compiled runner uses for each dimension of a call."""

    block_size: int
    batch_sizes: tuple[int, ...]  # decode rows per call
    chunk_lengths: tuple[int, ...]  # prefill tokens per call
    context_blocks: tuple[int, ...]  # KV blocks gathered per sequence

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "chunk_lengths", "context_blocks"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} must be distinct ascending positive sizes, got {values}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def for_limits(cls, max_num_seqs: int, max_chunk_tokens: int, max_model_len: int, block_size: int,
                   min_chunk: int = 16, min_context_tokens: int = 128, min_batch: int = 8) -> "ShapeBuckets":
        """Power-of-two buckets covering the engine's limits (each limit is itself a bucket).

        Decode batches are 1 row or at least `min_batch` rows: a TPU pads rows to 8 sublanes
        anyway, and XLA:CPU runs 2..7-row products with the 262k-row LM head ~30x slower than
        1 or 8 rows (measured), so 2..7 rows are padded to 8."""
        max_blocks = math.ceil(max_model_len / block_size)
        max_chunk_tokens = min(max_chunk_tokens, max_model_len)
        first_blocks = min(max_blocks, max(1, min_context_tokens // block_size))
        return cls(block_size=block_size,
                   batch_sizes=(1, *powers_of_two_up_to(max(min_batch, max_num_seqs), min_batch)),
                   chunk_lengths=powers_of_two_up_to(max(2, max_chunk_tokens), min(min_chunk, max(2, max_chunk_tokens))),
                   context_blocks=powers_of_two_up_to(max_blocks, first_blocks))

    @property
    def max_model_len(self) -> int:
        """Longest sequence (tokens) the largest context bucket holds."""
        return self.context_blocks[-1] * self.block_size

    def decode_shape(self, rows: int, blocks: int) -> GraphShape:
        """Padded shape of a decode call over `rows` sequences needing up to `blocks` blocks."""
        return GraphShape(pick(self.batch_sizes, rows, "decode batch"), 1,
                          pick(self.context_blocks, blocks, "context blocks"))

    def prefill_shape(self, tokens: int, blocks: int) -> GraphShape:
        """Padded shape of a prefill call of `tokens` (>= 2) new tokens needing `blocks` blocks."""
        return GraphShape(1, pick(self.chunk_lengths, tokens, "prefill chunk"),
                          pick(self.context_blocks, blocks, "context blocks"))

    def graph_shapes(self) -> list[GraphShape]:
        """Every shape `decode_shape` / `prefill_shape` can return for sequences within the limits."""
        shapes = [GraphShape(b, 1, nb) for b in self.batch_sizes for nb in self.context_blocks]
        smallest_chunk = 2
        for chunk in self.chunk_lengths:
            # The chunk's shortest member needs this many blocks even with nothing cached.
            needed = math.ceil(smallest_chunk / self.block_size)
            if needed > self.context_blocks[-1]:
                break
            fewest = pick(self.context_blocks, needed, "context blocks")
            shapes.extend(GraphShape(1, chunk, nb) for nb in self.context_blocks if nb >= fewest)
            smallest_chunk = chunk + 1
        return shapes

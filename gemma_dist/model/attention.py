"""The paged KV cache and the per-step attention metadata.

The cache of one layer is a pair of tensors (num_blocks, block_size, kv_heads, head_dim);
a sequence's keys live in the blocks its block table lists, in position order. The
metadata for a step is built once from plain Python lists and shared by every layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)


@dataclasses.dataclass
class KeyView:
    """Which cache blocks a layer kind gathers per sequence, and which keys each query may see."""

    block_tables: torch.Tensor  # (B, nb) int64 block ids, padded with block 0 (masked)
    mask: torch.Tensor  # (B, Tq, nb * block_size) bool: True where query i may attend key j


@dataclasses.dataclass
class AttentionGroup:
    """Sequences whose attention runs as one batched computation.

    All decode rows (one new token each) form one group; every prefill chunk is a group of
    its own. A query row's result then depends only on its own sequence, never on what else
    shares the step (batch invariance: the same tokens alone or in any batch).
    """

    token_index: torch.Tensor  # (B * Tq,) flat token index of each query row
    batch: int  # B
    max_q: int  # Tq
    global_view: KeyView  # GLOBAL layers: whole context
    window_view: KeyView  # LOCAL layers: only blocks the sliding window reaches


@dataclasses.dataclass
class KernelInputs:
    """Inputs of the fused paged-attention kernel (`paged_attention_kernel`), all int32."""

    token_seq: torch.Tensor  # (T,) which row of block_tables each query token reads
    block_tables: torch.Tensor  # (B, max_blocks) physical block ids (unused tail: any valid id)
    positions: torch.Tensor  # (T,) each query token's position: it sees keys at positions <= it
    sliding_window: int | None  # window of LOCAL layers (keys within the last `window` positions)


@dataclasses.dataclass
class AttentionMetadata:
    """Everything attention needs about one step's flattened batch of B sequences / T tokens."""

    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot (block * block_size + offset) per new token
    groups: list[AttentionGroup]  # decode group first (if any), then one group per prefill chunk
    output_order: torch.Tensor | None  # (T,) row of each flat token in the groups' stacked output; None = same order
    last_token_index: torch.Tensor  # (B,) int64: flat index of each sequence's last new token
    kernel: KernelInputs | None = None  # set: attention runs in the fused kernel (groups unused)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
    """Zeroed paged cache for every layer (kv heads of this rank only)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' k, v (T, Hkv, D) at their slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _key_view(first_blocks: list[int], block_tables: Sequence[Sequence[int]], query_pos: list[list[int]],
              block_size: int, window: int | None, device: torch.device | str) -> KeyView:
    """Gather plan for blocks [first_blocks[b], end) of each sequence, with its causal/window mask."""
    last_blocks = [p[-1] // block_size + 1 for p in query_pos]
    num = max(last - first for first, last in zip(first_blocks, last_blocks))
    tables = torch.zeros((len(query_pos), num), dtype=torch.int64)
    key_pos = torch.empty((len(query_pos), num * block_size), dtype=torch.int64)
    offsets = torch.arange(num * block_size)
    for b, (first, last) in enumerate(zip(first_blocks, last_blocks)):
        tables[b, : last - first] = torch.tensor(block_tables[b][first:last], dtype=torch.int64)
        key_pos[b] = first * block_size + offsets
    q_pos = torch.tensor(query_pos, dtype=torch.int64)  # (B, Tq)
    mask = key_pos[:, None, :] <= q_pos[:, :, None]  # causal (also hides padded blocks)
    if window is not None:
        mask &= (q_pos[:, :, None] - key_pos[:, None, :]) < window
    return KeyView(tables.to(device), mask.to(device))


def _group(token_index: list[int], tables: list[Sequence[int]], cached: list[int], query_pos: list[list[int]],
           block_size: int, sliding_window: int | None, device: torch.device | str) -> AttentionGroup:
    """One attention group over sequences with the same number of query rows."""
    whole = _key_view([0] * len(tables), tables, query_pos, block_size, None, device)
    if sliding_window is None:
        windowed = whole
    else:
        first = [max(0, c - sliding_window + 1) // block_size for c in cached]
        windowed = _key_view(first, tables, query_pos, block_size, sliding_window, device)
    return AttentionGroup(torch.tensor(token_index, dtype=torch.int64, device=device), len(tables),
                          len(query_pos[0]), whole, windowed)


def kernel_inputs(query_lens: Sequence[int], cached_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                  sliding_window: int | None, device: torch.device | str, width: int | None = None) -> KernelInputs:
    """Fused-kernel inputs for B sequences, sequence b adding query_lens[b] tokens after cached_lens[b]
    (block tables padded with block 0 to `width`, default the longest)."""
    width = width or max(len(t) for t in block_tables)
    tables = torch.zeros((len(block_tables), width), dtype=torch.int32)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table[:width], dtype=torch.int32)
    token_seq = [b for b, q in enumerate(query_lens) for _ in range(q)]
    positions = [p for q, c in zip(query_lens, cached_lens) for p in range(c, c + q)]
    return KernelInputs(torch.tensor(token_seq, dtype=torch.int32, device=device), tables.to(device),
                        torch.tensor(positions, dtype=torch.int32, device=device), sliding_window)


def build_attention_metadata(query_lens: Sequence[int], cached_lens: Sequence[int],
                             block_tables: Sequence[Sequence[int]], block_size: int,
                             sliding_window: int | None,
                             device: torch.device | str = "cpu", use_kernel: bool = False) -> AttentionMetadata:
    """Metadata for B sequences, sequence b adding query_lens[b] tokens after cached_lens[b].

    Tokens are flattened sequence by sequence; the block table of b must cover
    cached_lens[b] + query_lens[b] positions. use_kernel: attention runs in the fused
    paged-attention kernel, which needs only `kernel` (no gather groups are built).
    """
    if not (len(query_lens) == len(cached_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, cached_lens and block_tables need one entry per sequence")
    slots: list[int] = []
    starts = [0, *_cumulative(query_lens)]
    for b, (q_len, cached, table) in enumerate(zip(query_lens, cached_lens, block_tables)):
        if q_len < 1:
            raise ValueError(f"sequence {b} has no new tokens")
        if len(table) * block_size < cached + q_len:
            raise ValueError(f"sequence {b}: block table covers {len(table) * block_size} positions, "
                             f"needs {cached + q_len}")
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(cached, cached + q_len))
    if use_kernel:
        last = torch.tensor(starts[1:], dtype=torch.int64) - 1
        return AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=device), [], None, last.to(device),
                                 kernel_inputs(query_lens, cached_lens, block_tables, sliding_window, device))
    decode = [b for b, q in enumerate(query_lens) if q == 1]
    groups, order = [], []
    if decode:
        groups.append(_group([starts[b] for b in decode], [block_tables[b] for b in decode],
                             [cached_lens[b] for b in decode], [[cached_lens[b]] for b in decode],
                             block_size, sliding_window, device))
        order.extend(starts[b] for b in decode)
    for b, q_len in enumerate(query_lens):
        if q_len > 1:
            rows = list(range(starts[b], starts[b] + q_len))
            positions = list(range(cached_lens[b], cached_lens[b] + q_len))
            groups.append(_group(rows, [block_tables[b]], [cached_lens[b]], [positions], block_size,
                                 sliding_window, device))
            order.extend(rows)
    output_order = None
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        output_order = inverse.to(device)
    last = torch.tensor(starts[1:], dtype=torch.int64) - 1
    return AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                             groups=groups, output_order=output_order, last_token_index=last.to(device))


def positions_of(query_lens: Sequence[int], cached_lens: Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(T,) int64 positions of the flattened new tokens."""
    pos = [p for q, c in zip(query_lens, cached_lens) for p in range(c, c + q)]
    return torch.tensor(pos, dtype=torch.int64, device=device)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return math.ceil(num_tokens / block_size)


def _cumulative(values: Sequence[int]):
    total = 0
    for v in values:
        total += v
        yield total

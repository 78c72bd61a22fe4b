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


def _key_view(tables: torch.Tensor, first_blocks: torch.Tensor, query_pos: torch.Tensor, block_size: int,
              window: int | None) -> KeyView:
    """Gather plan for blocks [first_blocks[b], last block of its queries] of each sequence, with its
    causal / window mask. tables (B, W) int64 holds each sequence's block table (entries past a
    sequence's blocks are any valid block id: their keys are masked); query_pos (B, Tq) int64."""
    batch = tables.shape[0]
    last_blocks = query_pos[:, -1] // block_size  # (B,) block of each sequence's last query
    num = int((last_blocks - first_blocks).max()) + 1
    cols = first_blocks[:, None] + torch.arange(num, device=tables.device)  # (B, num) table columns
    picked = tables.gather(1, cols.clamp(max=tables.shape[1] - 1))  # past the table: masked below
    offsets = torch.arange(block_size, device=tables.device)
    key_pos = (cols[:, :, None] * block_size + offsets).reshape(batch, num * block_size)  # (B, Lk)
    mask = key_pos[:, None, :] <= query_pos[:, :, None]  # causal (also hides blocks past the table)
    if window is not None:
        mask &= (query_pos[:, :, None] - key_pos[:, None, :]) < window
    return KeyView(picked, mask)


def _group(token_index: torch.Tensor, tables: torch.Tensor, query_pos: torch.Tensor, block_size: int,
           sliding_window: int | None) -> AttentionGroup:
    """One attention group over B sequences with Tq query rows each: tables (B, W), query_pos (B, Tq)."""
    zeros = torch.zeros(tables.shape[0], dtype=torch.int64, device=tables.device)
    whole = _key_view(tables, zeros, query_pos, block_size, None)
    if sliding_window is None:
        windowed = whole
    else:
        first = (query_pos[:, 0] - sliding_window + 1).clamp(min=0) // block_size
        windowed = _key_view(tables, first, query_pos, block_size, sliding_window)
    return AttentionGroup(token_index, tables.shape[0], query_pos.shape[1], whole, windowed)


def table_tensor(block_tables: Sequence[Sequence[int]], width: int | None = None,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(B, width) block tables from lists, padded with block 0 (default width: the longest)."""
    width = width or max(len(t) for t in block_tables)
    tables = torch.zeros((len(block_tables), width), dtype=dtype)
    for b, table in enumerate(block_tables):
        tables[b, : min(len(table), width)] = torch.tensor(table[:width], dtype=dtype)
    return tables


def kernel_inputs(query_lens: Sequence[int], cached_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                  sliding_window: int | None, device: torch.device | str, width: int | None = None) -> KernelInputs:
    """Fused-kernel inputs for B sequences, sequence b adding query_lens[b] tokens after cached_lens[b]
    (block tables padded with block 0 to `width`, default the longest)."""
    return _kernel_inputs(_sequence_of_tokens(query_lens), positions_of(query_lens, cached_lens),
                          table_tensor(block_tables, width, torch.int32), sliding_window, device)


def _sequence_of_tokens(query_lens: Sequence[int]) -> torch.Tensor:
    """(T,) int64: which sequence each flattened new token belongs to."""
    return torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens, dtype=torch.int64))


def _kernel_inputs(token_seq: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                   sliding_window: int | None, device: torch.device | str) -> KernelInputs:
    """KernelInputs from host tensors: token_seq and positions (T,), tables (B, W)."""
    return KernelInputs(token_seq.to(device, torch.int32), tables.to(device, torch.int32),
                        positions.to(device, torch.int32), sliding_window)


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
    for b, (q_len, cached, table) in enumerate(zip(query_lens, cached_lens, block_tables)):
        if q_len < 1:
            raise ValueError(f"sequence {b} has no new tokens")
        if len(table) * block_size < cached + q_len:
            raise ValueError(f"sequence {b}: block table covers {len(table) * block_size} positions, "
                             f"needs {cached + q_len}")
    return metadata_from_tables(query_lens, cached_lens, table_tensor(block_tables), block_size, sliding_window,
                                device, use_kernel)


def metadata_from_tables(query_lens: Sequence[int], cached_lens: Sequence[int], tables: torch.Tensor,
                         block_size: int, sliding_window: int | None, device: torch.device | str = "cpu",
                         use_kernel: bool = False, positions: torch.Tensor | None = None) -> AttentionMetadata:
    """`build_attention_metadata` over block tables already in one (B, W) int64 CPU tensor (a
    persistent batch's rows; W covers every sequence's new tokens). Vectorized: the host work
    grows with the number of sequences and prefill chunks, not with their context length.
    `positions`: the tokens' (T,) host positions, when the caller has them already."""
    q = torch.tensor(query_lens, dtype=torch.int64)
    if positions is None:
        positions = positions_of(query_lens, cached_lens)  # (T,) CPU
    seq_of_token = _sequence_of_tokens(query_lens)  # (T,)
    block_of_token = tables[seq_of_token, positions // block_size]
    slots = block_of_token * block_size + positions % block_size  # (T,) flat cache slots
    starts = torch.cumsum(q, 0) - q  # (B,) first flat token of each sequence
    last = (starts + q - 1).to(device)
    if use_kernel:
        return AttentionMetadata(slots.to(device), [], None, last,
                                 _kernel_inputs(seq_of_token, positions, tables, sliding_window, device))
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    groups, order = [], []
    if decode:
        index = torch.tensor(decode, dtype=torch.int64) if len(decode) < len(query_lens) else None
        token_index = starts if index is None else starts[index]
        rows = tables if index is None else tables[index]
        cached = torch.tensor(cached_lens, dtype=torch.int64)
        group = _group(token_index, rows, (cached if index is None else cached[index])[:, None], block_size,
                       sliding_window)
        groups.append(group)
        order.append(token_index)
    for b, q_len in enumerate(query_lens):
        if q_len > 1:
            token_index = torch.arange(int(starts[b]), int(starts[b]) + q_len)
            query_pos = torch.arange(cached_lens[b], cached_lens[b] + q_len)[None, :]
            groups.append(_group(token_index, tables[b: b + 1], query_pos, block_size, sliding_window))
            order.append(token_index)
    order_t = torch.cat(order) if len(order) > 1 else order[0]
    output_order = None
    if not torch.equal(order_t, torch.arange(len(order_t))):
        output_order = torch.empty_like(order_t)
        output_order[order_t] = torch.arange(len(order_t))
        output_order = output_order.to(device)
    for group in groups:
        group.token_index = group.token_index.to(device)
        for view in {id(group.global_view): group.global_view, id(group.window_view): group.window_view}.values():
            view.block_tables, view.mask = view.block_tables.to(device), view.mask.to(device)
    return AttentionMetadata(slot_mapping=slots.to(device), groups=groups, output_order=output_order,
                             last_token_index=last)


def positions_of(query_lens: Sequence[int], cached_lens: Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(T,) int64 positions of the flattened new tokens."""
    if all(n == 1 for n in query_lens):  # a decode step: one position per sequence
        return torch.tensor(cached_lens, dtype=torch.int64).to(device)
    q = torch.tensor(query_lens, dtype=torch.int64)
    starts = torch.cumsum(q, 0) - q
    flat = torch.arange(int(q.sum())) - torch.repeat_interleave(starts - torch.tensor(cached_lens), q)
    return flat.to(device)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return math.ceil(num_tokens / block_size)

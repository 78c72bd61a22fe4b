"""The paged KV cache and the per-step attention metadata.

The cache of one layer is a pair of tensors (num_pages, block_size, kv_heads, head_dim). The
layers form G groups (gemma_dist.config.KVLayout: LOCAL and GLOBAL layers apart, for the
sliding-window pool; one group otherwise); a sequence has a block table per group, and a layer's
keys live in the pages its group's table lists, in position order. Layers in the same slot of
different groups share one tensor (their pages never overlap). The metadata for a step is built
once from plain Python lists and shared by every layer; each layer reads its group's row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

NO_PAGE = -1  # a table entry a LOCAL group gave back (outside its window: never read)


class KVCache(list):
    """Per layer: (k_cache, v_cache), each (num_pages, block_size, Hkv, D); `layer_group[l]` is
    the group whose block table layer l reads."""

    def __init__(self, pairs, layer_group: Sequence[int]):
        super().__init__(pairs)
        self.layer_group = tuple(layer_group)


@dataclasses.dataclass
class KeyView:
    """Which cache blocks a layer kind gathers per sequence, and which keys each query may see."""

    block_tables: torch.Tensor  # (G, B, nb) int64 page ids per layer group, padded with page 0 (masked)
    mask: torch.Tensor  # (B, Tq, nb * block_size) bool: True where query i may attend key j
    # Built on first use and shared by every layer of the step (a layer's own work stays its math).
    _pages: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _hidden: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    def pages(self, group: int) -> torch.Tensor:
        """(B * nb,) layer group `group`'s page ids, sequence by sequence."""
        pages = self._pages.get(group)
        if pages is None:
            pages = self._pages[group] = self.block_tables[group].flatten()
        return pages

    def hidden(self) -> torch.Tensor:
        """(B, 1, 1, Tq, Lk) bool: True where a key is masked out (scores' layout in attention)."""
        if self._hidden is None:
            self._hidden = (~self.mask)[:, None, None]
        return self._hidden


@dataclasses.dataclass
class AttentionGroup:
    """Sequences whose attention runs as one batched computation.

    All decode rows (one new token each) form one group; prefill chunks form one group per
    shape (new tokens, cached tokens). A query row's result then depends only on its own
    sequence, never on what else shares the step (batch invariance: the same tokens alone or in
    any batch).
    """

    token_index: torch.Tensor  # (B * Tq,) flat token index of each query row
    batch: int  # B
    max_q: int  # Tq
    global_view: KeyView  # GLOBAL layers: whole context
    window_view: KeyView  # LOCAL layers: only blocks the sliding window reaches
    in_order: bool = False  # the group's rows are the step's tokens 0..T-1 in order (token_index is arange(T))


@dataclasses.dataclass
class KernelInputs:
    """Inputs of the fused paged-attention kernel (`paged_attention_kernel`), all int32."""

    token_seq: torch.Tensor  # (T,) which row of block_tables each query token reads
    block_tables: torch.Tensor  # (G, B, max_blocks) page ids per layer group (unused tail: any valid id)
    positions: torch.Tensor  # (T,) each query token's position: it sees keys at positions <= it
    sliding_window: int | None  # window of LOCAL layers (keys within the last `window` positions)


@dataclasses.dataclass
class AttentionMetadata:
    """Everything attention needs about one step's flattened batch of B sequences / T tokens."""

    slot_mapping: torch.Tensor  # (G, T) int64: per layer group, each new token's slot (page * block_size + offset)
    groups: list[AttentionGroup]  # decode group first (if any), then one per prefill chunk shape
    output_order: torch.Tensor | None  # (T,) row of each flat token in the groups' stacked output; None = same order
    last_token_index: torch.Tensor  # (B,) int64: flat index of each sequence's last new token
    kernel: KernelInputs | None = None  # set: attention runs in the fused kernel (groups unused)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                      layout=None) -> KVCache:
    """Zeroed paged cache of `num_blocks` pages for every layer (kv heads of this rank only).
    `layout` (a KVLayout; default one group of all layers): layers of one slot share a tensor."""
    from gemma_dist.config import KVLayout

    layout = layout or KVLayout.single(num_layers)
    if len(layout.layer_slot) != num_layers:
        raise ValueError(f"the KV layout has {len(layout.layer_slot)} layers, the model {num_layers}")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    slots = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
             for _ in range(layout.group_size)]
    return KVCache([slots[slot] for slot in layout.layer_slot], layout.layer_group)


def copy_pages(cache: KVCache, pairs: list[tuple[int, int]]) -> None:
    """Copy KV pages source -> destination in every layer's cache (a page id belongs to one layer
    group, so copying it in every tensor copies exactly that group's layers)."""
    device = cache[0][0].device
    src = torch.tensor([s for s, _ in pairs], device=device)
    dst = torch.tensor([d for _, d in pairs], device=device)
    seen: set[int] = set()
    for layer in cache:
        for tensor in layer:  # (pages, block_size, Hkv, D): k, then v; layers of one slot share them
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensor.index_copy_(0, dst, tensor.index_select(0, src))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' k, v (T, Hkv, D) at their slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _key_view(tables: torch.Tensor, first_blocks: torch.Tensor, query_pos: torch.Tensor, block_size: int,
              window: int | None) -> KeyView:
    """Gather plan for blocks [first_blocks[b], last block of its queries] of each sequence, with its
    causal / window mask. tables (G, B, W) int64 holds each sequence's block table per layer group
    (entries past a sequence's blocks are any valid page id: their keys are masked); query_pos
    (B, Tq) int64."""
    groups, batch, width = tables.shape
    last_blocks = query_pos[:, -1] // block_size  # (B,) block of each sequence's last query
    num = int((last_blocks - first_blocks).max()) + 1
    cols = first_blocks[:, None] + torch.arange(num, device=tables.device)  # (B, num) table columns
    # (G, B, num) page ids; columns past the table read its last one, masked below.
    picked = tables.gather(2, cols.clamp(max=width - 1)[None].expand(groups, batch, num))
    offsets = torch.arange(block_size, device=tables.device)
    key_pos = (cols[:, :, None] * block_size + offsets).reshape(batch, num * block_size)  # (B, Lk)
    mask = key_pos[:, None, :] <= query_pos[:, :, None]  # causal (also hides blocks past the table)
    if window is not None:
        mask &= (query_pos[:, :, None] - key_pos[:, None, :]) < window
    return KeyView(picked, mask)


def _group(token_index: torch.Tensor, tables: torch.Tensor, query_pos: torch.Tensor, block_size: int,
           sliding_window: int | None) -> AttentionGroup:
    """One attention group over B sequences with Tq query rows each: tables (G, B, W), query_pos (B, Tq)."""
    zeros = torch.zeros(tables.shape[1], dtype=torch.int64, device=tables.device)
    whole = _key_view(tables, zeros, query_pos, block_size, None)
    if sliding_window is None:
        windowed = whole
    else:
        first = (query_pos[:, 0] - sliding_window + 1).clamp(min=0) // block_size
        windowed = _key_view(tables, first, query_pos, block_size, sliding_window)
    return AttentionGroup(token_index, tables.shape[1], query_pos.shape[1], whole, windowed)


def table_rows(block_table: Sequence, groups: int = 1) -> list[list[int]]:
    """One sequence's block table as G rows of page ids. Entries are tuples (a page per group;
    NO_PAGE becomes page 0, never read) or plain block ids b, which stand for pages b * G + g (a
    table laid out for a cache of G pages per block)."""
    rows = [[] for _ in range(groups)]
    for entry in block_table:
        for g, row in enumerate(rows):
            page = entry[g] if isinstance(entry, tuple) else entry * groups + g
            row.append(page if page != NO_PAGE else 0)
    return rows


def table_tensor(block_tables: Sequence[Sequence], width: int | None = None,
                 dtype: torch.dtype = torch.int64, groups: int = 1) -> torch.Tensor:
    """(G, B, width) page ids from B block tables (see `table_rows`), padded with page 0
    (default width: the longest)."""
    width = width or max(len(t) for t in block_tables)
    tables = torch.zeros((groups, len(block_tables), width), dtype=dtype)
    for b, table in enumerate(block_tables):
        used = min(len(table), width)
        if used:
            tables[:, b, :used] = torch.tensor(table_rows(table[:used], groups), dtype=dtype)
    return tables


def kernel_inputs(query_lens: Sequence[int], cached_lens: Sequence[int], block_tables: Sequence[Sequence],
                  sliding_window: int | None, device: torch.device | str, width: int | None = None,
                  groups: int = 1) -> KernelInputs:
    """Fused-kernel inputs for B sequences, sequence b adding query_lens[b] tokens after cached_lens[b]
    (block tables of `groups` layer groups, padded with page 0 to `width`, default the longest)."""
    return _kernel_inputs(_sequence_of_tokens(query_lens), positions_of(query_lens, cached_lens),
                          table_tensor(block_tables, width, torch.int32, groups), sliding_window, device)


def _sequence_of_tokens(query_lens: Sequence[int]) -> torch.Tensor:
    """(T,) int64: which sequence each flattened new token belongs to."""
    return torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens, dtype=torch.int64))


def _kernel_inputs(token_seq: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                   sliding_window: int | None, device: torch.device | str) -> KernelInputs:
    """KernelInputs from host tensors: token_seq and positions (T,), tables (G, B, W)."""
    return KernelInputs(token_seq.to(device, torch.int32), tables.to(device, torch.int32),
                        positions.to(device, torch.int32), sliding_window)


def build_attention_metadata(query_lens: Sequence[int], cached_lens: Sequence[int],
                             block_tables: Sequence[Sequence], block_size: int,
                             sliding_window: int | None,
                             device: torch.device | str = "cpu", use_kernel: bool = False,
                             groups: int = 1) -> AttentionMetadata:
    """Metadata for B sequences, sequence b adding query_lens[b] tokens after cached_lens[b].

    Tokens are flattened sequence by sequence; the block table of b must cover
    cached_lens[b] + query_lens[b] positions (entries: see `table_rows`; `groups` layer groups).
    use_kernel: attention runs in the fused paged-attention kernel, which needs only `kernel`
    (no gather groups are built).
    """
    if not (len(query_lens) == len(cached_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, cached_lens and block_tables need one entry per sequence")
    for b, (q_len, cached, table) in enumerate(zip(query_lens, cached_lens, block_tables)):
        if q_len < 1:
            raise ValueError(f"sequence {b} has no new tokens")
        if len(table) * block_size < cached + q_len:
            raise ValueError(f"sequence {b}: block table covers {len(table) * block_size} positions, "
                             f"needs {cached + q_len}")
    return metadata_from_tables(query_lens, cached_lens, table_tensor(block_tables, groups=groups), block_size,
                                sliding_window, device, use_kernel)


def metadata_from_tables(query_lens: Sequence[int], cached_lens: Sequence[int], tables: torch.Tensor,
                         block_size: int, sliding_window: int | None, device: torch.device | str = "cpu",
                         use_kernel: bool = False, positions: torch.Tensor | None = None) -> AttentionMetadata:
    """`build_attention_metadata` over block tables already in one (G, B, W) int64 CPU tensor (a
    persistent batch's rows; W covers every sequence's new tokens). Vectorized: the host work
    grows with the number of sequences and prefill chunks, not with their context length.
    `positions`: the tokens' (T,) host positions, when the caller has them already."""
    q = torch.tensor(query_lens, dtype=torch.int64)
    if positions is None:
        positions = positions_of(query_lens, cached_lens)  # (T,) CPU
    seq_of_token = _sequence_of_tokens(query_lens)  # (T,)
    block_of_token = tables[:, seq_of_token, positions // block_size]  # (G, T)
    slots = block_of_token * block_size + positions % block_size  # (G, T) flat cache slots
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
        rows = tables if index is None else tables[:, index]
        cached = torch.tensor(cached_lens, dtype=torch.int64)
        group = _group(token_index, rows, (cached if index is None else cached[index])[:, None], block_size,
                       sliding_window)
        groups.append(group)
        order.append(token_index)
    for (q_len, cached), members in _prefill_shapes(query_lens, cached_lens).items():
        first = starts[members]  # (B,) each chunk's first flat token
        token_index = (first[:, None] + torch.arange(q_len)).flatten()  # (B * Tq,) chunk by chunk
        query_pos = torch.arange(cached, cached + q_len).expand(len(members), q_len)  # (B, Tq)
        groups.append(_group(token_index, tables[:, members], query_pos, block_size, sliding_window))
        order.append(token_index)
    order_t = torch.cat(order) if len(order) > 1 else order[0]
    output_order = None
    if not torch.equal(order_t, torch.arange(len(order_t))):
        output_order = torch.empty_like(order_t)
        output_order[order_t] = torch.arange(len(order_t))
        output_order = output_order.to(device)
    if len(groups) == 1 and output_order is None:  # e.g. a decode-only step: queries need no reordering
        groups[0].in_order = True
    for group in groups:
        group.token_index = group.token_index.to(device)
        for view in {id(group.global_view): group.global_view, id(group.window_view): group.window_view}.values():
            view.block_tables, view.mask = view.block_tables.to(device), view.mask.to(device)
    return AttentionMetadata(slot_mapping=slots.to(device), groups=groups, output_order=output_order,
                             last_token_index=last)


def _prefill_shapes(query_lens: Sequence[int], cached_lens: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """The prefill chunks (more than one new token) by shape: (new tokens, cached tokens) → the
    sequences with that shape, in step order. Chunks of one shape share an attention group: the
    batched products compute each chunk as it would be alone (the same query rows over the same
    key span), and a step of many fresh prompts runs a group per prompt length, not per prompt
    (the overhead bench's first step, 256 short prompts: forward 1,142 -> 107 ms). Peak
    memory stays within what one chunk of the step's token budget may take."""
    shapes: dict[tuple[int, int], list[int]] = {}
    for b, (q_len, cached) in enumerate(zip(query_lens, cached_lens)):
        if q_len > 1:
            shapes.setdefault((q_len, cached), []).append(b)
    return shapes


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

"""CUDA graphs of the decode step: one captured graph per batch bucket, replayed every step.

A decode step of a small model is launch-bound (hundreds of small kernels per token); a
replayed graph launches them all at once. Capturing needs fixed shapes and addresses, so the
step reads static input buffers sized for the largest bucket: token ids, positions, cache
slots and block tables (as wide as `max_model_len` needs). Attention runs in the fused
paged-attention kernel, whose shapes do not depend on context length. Rows past the real
batch are padding: they write K/V into a scratch block and their logits are dropped.

Without CUDA (`capture=False`) the same buffers run eagerly, which is how CPU tests check the
padding and buffer logic.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gemma_dist.engine.buckets import pick
from gemma_dist.model.attention import AttentionMetadata, KernelInputs, table_rows

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class DecodeGraphs:
    """Captured decode steps for batch sizes in `batch_sizes` (padded up to the next one)."""

    def __init__(self, model, kv_cache, block_size: int, max_model_len: int, scratch_block: int,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, capture: bool = True):
        self.model, self.kv_cache = model, kv_cache
        self.block_size = block_size
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.scratch_block = scratch_block  # a page past the real cache: padded rows write there
        self.groups = max(getattr(kv_cache, "layer_group", (0,))) + 1  # block tables per sequence
        self.capture = capture
        device = next(model.parameters()).device
        rows = self.batch_sizes[-1]
        self.ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions32 = torch.zeros(rows, dtype=torch.int32, device=device)
        self.slots = torch.zeros(self.groups, rows, dtype=torch.int64, device=device)
        self.tables = torch.zeros(self.groups, rows, self.max_blocks, dtype=torch.int32, device=device)
        self.rows = torch.arange(rows, dtype=torch.int64, device=device)
        self.token_seq = torch.arange(rows, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def fits(self, steps) -> bool:
        """True for a decode-only step this object can run (batch and context within bounds)."""
        return (len(steps) <= self.batch_sizes[-1] and all(len(s.token_ids) == 1 for s in steps)
                and all(math.ceil((s.num_cached + 1) / self.block_size) <= self.max_blocks for s in steps))

    def fits_prepared(self, step) -> bool:
        """`fits` for a step built by a persistent batch (gemma_dist.engine.persistent_batch)."""
        n = len(step.num_cached)
        return (n <= self.batch_sizes[-1] and step.input_ids.shape[0] == n
                and max(step.num_cached) // self.block_size + 1 <= self.max_blocks)

    def run_prepared(self, step) -> torch.Tensor:
        """Logits (B, vocab) fp32 for a decode-only prepared step (see `fits_prepared`)."""
        n = len(step.num_cached)
        batch = pick(self.batch_sizes, n, "decode batch")
        bs = self.block_size
        positions = torch.tensor(step.num_cached, dtype=torch.int64)
        width = int(positions.max()) // bs + 1
        ids = torch.zeros(batch, dtype=torch.int64)
        ids[:n] = step.host_input_ids
        padded_positions = torch.zeros(batch, dtype=torch.int64)
        padded_positions[:n] = positions
        slots = torch.full((self.groups, batch), self.scratch_block * bs, dtype=torch.int64)
        slots[:, :n] = step.tables[:, torch.arange(n), positions // bs] * bs + positions % bs  # host-side: no sync
        tables = torch.full((self.groups, batch, width), self.scratch_block, dtype=torch.int32)
        tables[:, :n] = step.tables[:, :, :width].to(torch.int32)
        self._copy_in(ids, padded_positions, slots, tables, batch, width)
        if self.capture:
            self._graphs[batch].replay()
            return self._outputs[batch][:n]
        return self._forward(batch)[:n]

    def run(self, steps) -> torch.Tensor:
        """Logits (len(steps), vocab) fp32 for a decode-only step (see `fits`)."""
        n = len(steps)
        batch = pick(self.batch_sizes, n, "decode batch")
        self._fill(steps, batch)
        if self.capture:
            self._graphs[batch].replay()
            return self._outputs[batch][:n]
        return self._forward(batch)[:n]

    def _fill(self, steps, batch: int) -> None:
        """Copy the step into the static buffers; rows n..batch become scratch padding."""
        bs = self.block_size
        # Only the columns some row reads are copied: the kernel reads a row's table up to its
        # position's block, so stale entries further right are never touched.
        width = max((s.num_cached // bs + 1 for s in steps), default=1)
        ids = torch.zeros(batch, dtype=torch.int64)
        positions = torch.zeros(batch, dtype=torch.int64)
        slots = torch.full((self.groups, batch), self.scratch_block * bs, dtype=torch.int64)
        tables = torch.full((self.groups, batch, width), self.scratch_block, dtype=torch.int32)
        for row, step in enumerate(steps):
            pos = step.num_cached
            ids[row] = step.token_ids[0]
            positions[row] = pos
            pages = torch.tensor(table_rows(step.block_table, self.groups), dtype=torch.int64)  # (G, blocks)
            slots[:, row] = pages[:, pos // bs] * bs + pos % bs
            used = min(len(step.block_table), width)
            tables[:, row, :used] = pages[:, :used].to(torch.int32)
        self._copy_in(ids, positions, slots, tables, batch, width)

    def _copy_in(self, ids, positions, slots, tables, batch: int, width: int) -> None:
        """Host tensors of one step → the static device buffers (rows past the step: padding)."""
        self.ids[:batch].copy_(ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.positions32[:batch].copy_(positions.to(torch.int32), non_blocking=True)
        self.slots[:, :batch].copy_(slots, non_blocking=True)
        self.tables[:, :batch, :width].copy_(tables, non_blocking=True)

    def _forward(self, batch: int) -> torch.Tensor:
        """The decode step over the first `batch` rows of the static buffers → (batch, vocab) logits."""
        kernel = KernelInputs(self.token_seq[:batch], self.tables[:, :batch], self.positions32[:batch],
                              self.model.config.sliding_window)
        meta = AttentionMetadata(self.slots[:, :batch], [], None, self.rows[:batch], kernel)
        hidden = self.model(self.ids[:batch], self.positions[:batch], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        pool = None
        for batch in reversed(self.batch_sizes):
            self._fill([], batch)  # all padding
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up launches (Triton compiles, cuBLAS picks kernels)
                for _ in range(2):
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[batch] = self._forward(batch)
            pool = graph.pool()
            self._graphs[batch] = graph
        torch.cuda.synchronize()

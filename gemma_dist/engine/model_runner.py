"""Turns one step's plan into tensors, runs the model over the paged KV cache, and samples.

The plan is a list of `StepInput`s, one per sequence: the new tokens to feed (a prompt
chunk or the last generated token), how many tokens of it are already cached, its block
table, and whether to sample after it (not after a mid-prompt chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from gemma_dist.model.attention import allocate_kv_cache, build_attention_metadata, positions_of
from gemma_dist.model.gemma import GemmaForCausalLM
from gemma_dist.sampling import Sampler, SampleResult, SamplingRow


@dataclasses.dataclass
class StepInput:
    """One sequence's share of a step."""

    token_ids: list[int]  # new tokens whose K/V are computed this step
    num_cached: int  # tokens of this sequence already in the cache (positions start here)
    block_table: list[int]  # cache blocks covering num_cached + len(token_ids) positions
    sampling: SamplingRow | None  # sample a next token after the last new token; None = don't
    request_id: str | None = None  # whose tokens these are (remote runners keep per-request state)


def kv_bytes_per_token(model: GemmaForCausalLM, dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies in this rank's cache, all layers together."""
    c = model.config
    return 2 * c.num_layers * model.num_kv_heads_per_rank * c.head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler; executes steps."""

    def __init__(self, model: GemmaForCausalLM, num_blocks: int, block_size: int,
                 sampler: Sampler | None = None, vocab_limit: int | None = None):
        self.model = model
        self.vocab_limit = vocab_limit  # ids at or above it are never sampled (no tokenizer piece)
        self.block_size = block_size
        self.num_blocks = num_blocks
        dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        c = model.config
        self.kv_cache = allocate_kv_cache(c.num_layers, num_blocks, block_size, model.num_kv_heads_per_rank,
                                          c.head_dim, dtype, self.device)
        self.sampler = sampler or Sampler()

    @torch.inference_mode()
    def execute(self, steps: Sequence[StepInput], sample: bool = True) -> SampleResult | None:
        """Run one forward over all steps; sample for the steps that ask. Result rows follow
        the order of the sampling steps. With sample=False (tensor-parallel ranks other than
        0) only take part in the step's collectives and return None."""
        hidden, meta = self._forward(steps)
        rows = [i for i, s in enumerate(steps) if s.sampling is not None]
        if not rows:
            return SampleResult(token_ids=[], logprobs=[]) if sample else None
        last = meta.last_token_index[torch.tensor(rows, device=self.device)]
        logits = self.model.compute_logits(hidden[last])  # (S, vocab) fp32, gathered over ranks
        if not sample:
            return None
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        return self.sampler(logits, [steps[i].sampling for i in rows])

    @torch.inference_mode()
    def logits(self, steps: Sequence[StepInput]) -> torch.Tensor:
        """Logits (S, vocab) at the last new token of every step (no sampling; for tests/tools)."""
        hidden, meta = self._forward(steps)
        return self.model.compute_logits(hidden[meta.last_token_index])

    def _forward(self, steps: Sequence[StepInput]):
        query_lens = [len(s.token_ids) for s in steps]
        cached = [s.num_cached for s in steps]
        meta = build_attention_metadata(query_lens, cached, [s.block_table for s in steps],
                                        self.block_size, self.model.config.sliding_window, self.device)
        ids = torch.tensor([t for s in steps for t in s.token_ids], dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions_of(query_lens, cached, self.device), self.kv_cache, meta)
        return hidden, meta

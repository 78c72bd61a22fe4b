"""Turns one step's plan into tensors, runs the model over the paged KV cache, and samples.

The plan is a list of `StepInput`s, one per sequence: the new tokens to feed (a prompt
chunk or the last generated token), how many tokens of it are already cached, its block
table, and whether to sample after it (not after a mid-prompt chunk).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Sequence

import torch

from gemma_dist.config import KVLayout
from gemma_dist.model.attention import allocate_kv_cache, build_attention_metadata, positions_of
from gemma_dist.model.gemma import GemmaForCausalLM
from gemma_dist.model.layers import set_cpu_kernels
from gemma_dist.sampling import Sampler, SampleResult, SamplingRow, sample_vocab_parallel

if TYPE_CHECKING:
    from gemma_dist.engine.persistent_batch import PreparedStep


log = logging.getLogger(__name__)

# glibc malloc settings for a process computing on CPU tensors (see tune_malloc_for_tensors).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MALLOC_SETTINGS = {
    _M_MMAP_THRESHOLD: 32 << 20,  # blocks below 32 MiB (glibc's largest allowed) come from the heap, not mmap
    _M_TRIM_THRESHOLD: 1 << 30,  # the heap gives memory back to the OS only past 1 GiB free at its top
    _M_TOP_PAD: 64 << 20,  # and grows 64 MiB beyond what a request needs
}


@functools.cache
def tune_malloc_for_tensors() -> bool:
    """Keep a CPU runner's freed tensor memory in the process (once per process; glibc only; off
    with GEMMA_DIST_MALLOC_TUNING=0). Returns whether the settings are in force.

    glibc maps each block over 128 KiB afresh and unmaps it on free, and returns the top of its
    heap to the OS as soon as it frees: a step's activations (MiBs each, allocated and freed per
    op; torch's CPU allocator has no cache of its own) then fault in zeroed pages every time. A
    16 MiB tensor allocated and freed step after step faulted in 3,584 pages a step with glibc's
    defaults here, none with these settings. Measured on a 2-core EPYC (Gemma 3 270M, fp32, 32 x
    (128 + 128), a fresh LLM three times in one process, three processes each): 143-158 tok/s for
    the first LLM of a process with glibc's defaults (later ones 155-176, as glibc's own
    thresholds adapt), 170-191 with these settings (later ones 171-189). A shard worker is always
    a new process. The price: the process keeps up to 1 GiB of freed memory for reuse.
    """
    if os.environ.get("GEMMA_DIST_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave otherwise
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    tuned = all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
    if not tuned:
        log.warning("glibc refused a malloc setting; CPU steps may keep faulting in fresh pages")
    return tuned


@dataclasses.dataclass
class StepInput:
    """One sequence's share of a step."""

    token_ids: list[int]  # new tokens whose K/V are computed this step
    num_cached: int  # tokens of this sequence already in the cache (positions start here)
    block_table: list  # entries covering num_cached + len(token_ids) positions (attention.table_rows)
    sampling: SamplingRow | None  # sample a next token after the last new token; None = don't
    request_id: str | None = None  # whose tokens these are (remote runners keep per-request state)


def kv_bytes_per_token(model: GemmaForCausalLM, dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies in this rank's cache, all layers together."""
    c = model.config
    return 2 * c.num_layers * model.num_kv_heads_per_rank * c.head_dim * torch.finfo(dtype).bits // 8


def sample_rows(sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow],
                vocab_limit: int | None) -> SampleResult:
    """Sample one token per row of logits (S, vocab); ids >= vocab_limit are never chosen.
    The sampler runs on the host (its generators and buffers are CPU ones): device logits
    are copied over first, except on CUDA for argmax-only rows, whose argmax is taken there
    (S ids cross to the host instead of S x vocab floats)."""
    fast, rest = argmax_rows(rows) if logits.device.type == "cuda" else ([], [])
    if fast:
        limit = logits.shape[-1] if vocab_limit is None else min(vocab_limit, logits.shape[-1])
        picked = logits[torch.tensor(fast, device=logits.device), :limit].argmax(dim=-1).tolist()
        chosen = None
        if rest:
            chosen = sample_rows(sampler, logits[torch.tensor(rest, device=logits.device)].float().cpu(),
                                 [rows[j] for j in rest], vocab_limit)
        return merge_results(len(rows), fast, picked, rest, chosen)
    if logits.device.type != "cpu":
        logits = logits.float().cpu()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    return sampler(logits, list(rows))


def argmax_rows(rows: Sequence[SamplingRow]) -> tuple[list[int], list[int]]:
    """Positions of the rows whose token is the plain argmax of the logits (SamplingParams.argmax_only;
    such a row has no constraint), and of the others."""
    fast, rest = [], []
    for j, row in enumerate(rows):
        (fast if row.params.argmax_only else rest).append(j)
    return fast, rest


def merge_results(count: int, fast: list[int], fast_tokens: list[int], rest: list[int],
                  chosen: SampleResult | None) -> SampleResult:
    """One step's result from its argmax rows' tokens (no logprobs) and the other rows' result."""
    token_ids, logprobs = [0] * count, [None] * count
    for j, token in zip(fast, fast_tokens):
        token_ids[j] = token
    if chosen is not None:
        for position, j in enumerate(rest):
            token_ids[j], logprobs[j] = chosen.token_ids[position], chosen.logprobs[position]
    return SampleResult(token_ids, logprobs)


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler; executes steps."""

    def __init__(self, model: GemmaForCausalLM, num_blocks: int, block_size: int,
                 sampler: Sampler | None = None, vocab_limit: int | None = None, attention: str = "auto",
                 decode_graphs: bool | None = None, max_model_len: int | None = None, prepack: bool = True,
                 window_pool: bool = True, argmax_head: bool = True, quantize: str | None = None):
        """attention: "gather" (batched matmuls over gathered keys; CPU default), "kernel" (the
        fused Triton kernel reading the paged cache; CUDA default) or "auto". decode_graphs:
        replay CUDA graphs for decode-only steps (default: on CUDA with the kernel); on CPU it
        runs the same static-buffer path uncaptured (tests). max_model_len bounds the graphs'
        block tables (default: the model's context). prepack: fp32 CPU weights get a oneDNN-packed
        copy (faster GEMMs for the price of the weights' memory once more; layers.PackedFp32).
        num_blocks: blocks of positions for all layers the cache's memory holds; with `window_pool`
        (a model with LOCAL layers) that memory is num_blocks x G pages of one layer group each
        (gemma_dist.config.KVLayout), so LOCAL layers can give back what their window left.
        argmax_head: argmax-only rows take the LM head's per-row maximum instead of whole logits
        (`_sample_hidden`; off only to measure against). quantize: "int8" runs every parallel layer
        (the LM head included) in int8 blocks on CPU (layers.Int8Blocks; not exact); CPU only."""
        self.model = model
        self.vocab_limit = vocab_limit  # ids at or above it are never sampled (no tokenizer piece)
        self.argmax_head = argmax_head  # argmax-only rows skip their whole logits (see _sample_hidden)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_layout = KVLayout.of(model.config, window_pool)
        self.kv_groups = self.kv_layout.num_groups  # block tables per sequence
        self.num_pages = num_blocks * self.kv_groups  # what the engine's BlockManager hands out
        dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            tune_malloc_for_tensors()  # before the KV cache and the first step allocate
        self.attention = _resolve_attention(attention, self.device, block_size)
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # Triton launches and graph capture use the current device
            torch.cuda.set_device(self.device)
        if decode_graphs is None:
            # Capturing nccl collectives (tp > 1) is supported by torch but untested here: off by default.
            decode_graphs = on_cuda and self.attention == "kernel" and not model.parallel.communicates
        if decode_graphs and self.attention != "kernel":
            raise ValueError("decode graphs need attention='kernel'")
        c = model.config
        # Decode graphs pad rows into one scratch page past the real cache.
        self.kv_cache = allocate_kv_cache(c.num_layers, self.num_pages + int(decode_graphs), block_size,
                                          model.num_kv_heads_per_rank, c.head_dim, dtype, self.device,
                                          self.kv_layout)
        self.sampler = sampler or Sampler()
        if quantize is not None and self.device.type != "cpu":
            raise ValueError(f"quantize={quantize!r} is a CPU mode; this model is on {self.device.type}")
        self.kernel_layers = set_cpu_kernels(model, quantize, prepack)  # layers with a CPU kernel
        self._logits: torch.Tensor | None = None  # the LM head's reused output buffer (CPU; _logits_buffer)
        self.decode_graphs = None
        if decode_graphs:
            from gemma_dist.engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(model, self.kv_cache, block_size,
                                              max_model_len or c.max_position_embeddings, self.num_pages,
                                              capture=on_cuda)

    @torch.inference_mode()
    def execute(self, steps: Sequence[StepInput], sample: bool = True) -> SampleResult | None:
        """Run one forward over all steps; sample for the steps that ask. Result rows follow
        the order of the sampling steps. With sample=False (tensor-parallel ranks other than
        0) only take part in the step's collectives and return None."""
        rows = [i for i, s in enumerate(steps) if s.sampling is not None]
        if self.decode_graphs is not None and self.decode_graphs.fits(steps):
            out = self.decode_graphs.run(steps)  # always: the step writes its K/V even if nothing samples
            logits = out[rows] if rows else None  # (S, vocab)
        else:
            hidden, meta = self._forward(steps)
            if not rows:
                return SampleResult(token_ids=[], logprobs=[]) if sample else None
            last = meta.last_token_index[torch.tensor(rows, device=self.device)]
            result = self._sample_hidden(hidden[last], [steps[i].sampling for i in rows], sample)
            return result if sample else None
        if not sample:
            return None
        if not rows:
            return SampleResult(token_ids=[], logprobs=[])
        return sample_rows(self.sampler, logits, [steps[i].sampling for i in rows], self.vocab_limit)

    def prepare(self, batch, plan) -> "PreparedStep":
        """A plan's tensors from a persistent batch (gemma_dist.engine.persistent_batch)."""
        return batch.prepare(plan, self.device, use_kernel=self.attention == "kernel",
                             sliding_window=self.model.config.sliding_window)

    @torch.inference_mode()
    def execute_prepared(self, step: "PreparedStep", sample: bool = True, times=None) -> SampleResult:
        """`execute` for a step built by a persistent batch (`prepare`); adds phase times to `times`.
        Every rank gets the sampled tokens (rank 0 samples: sample=True; at tp > 1 it shares them),
        since every rank's persistent batch appends them; only rank 0's carry logprobs."""
        start = time.perf_counter()
        rows = step.sample_rows
        hidden = logits = None
        if self.decode_graphs is not None and self.decode_graphs.fits_prepared(step):
            out = self.decode_graphs.run_prepared(step)  # (B, vocab)
            logits = out[rows] if rows else None
        else:
            hidden = self.model(step.input_ids, step.positions, self.kv_cache, step.meta)
            if rows:
                last = step.meta.last_token_index
                if len(rows) < len(step.num_cached):
                    last = last[torch.tensor(rows, device=self.device)]
                hidden = hidden[last]  # (S, H)
        sampled = time.perf_counter()
        if times is not None:
            times.forward += sampled - start
        if not rows:
            result = SampleResult(token_ids=[], logprobs=[])
        elif hidden is not None:  # the LM head runs in the sample phase: argmax rows never build logits
            result = self._sample_hidden(hidden, step.sampling, sample)
        elif sample:
            result = sample_rows(self.sampler, logits, step.sampling, self.vocab_limit)
        else:  # tp > 1 over gathered logits (CUDA graphs): rank 0 samples for everyone
            result = self._share_tokens(None, len(rows))
        if times is not None:
            times.sample += time.perf_counter() - sampled
        return result

    def _sample_hidden(self, hidden: torch.Tensor, rows: Sequence[SamplingRow], sample: bool) -> SampleResult | None:
        """Tokens for the sampling rows' final hidden states (S, H). Argmax-only rows take the LM
        head's per-row maximum (`GemmaForCausalLM.best_logits`: on CPU their (S, vocab) logits are
        never built); the others get logits and the sampler (on rank 0: sample=True). At tp > 1
        every rank returns the tokens (each appends them to its persistent batch), only rank 0's
        with logprobs; at tp = 1 with sample False, None unless every row is an argmax row."""
        fast, rest = argmax_rows(rows) if self.argmax_head else ([], [])
        if len(fast) == len(rows):  # every rank learns the winners from the same exchange
            return SampleResult(self._argmax_tokens(hidden), [None] * len(rows))
        if not fast:
            result = self._sample_logits(hidden, rows, sample)
        else:
            tokens = self._argmax_tokens(hidden[torch.tensor(fast, device=hidden.device)])
            chosen = self._sample_logits(hidden[torch.tensor(rest, device=hidden.device)], [rows[j] for j in rest],
                                         sample)
            result = None if chosen is None else merge_results(len(rows), fast, tokens, rest, chosen)
        if self.model.parallel.communicates:  # rank 0 sampled; every rank appends the tokens
            result = self._share_tokens(result, len(rows))
        return result

    def _sample_logits(self, hidden: torch.Tensor, rows: Sequence[SamplingRow], sample: bool) -> SampleResult | None:
        """Logits for the rows' hidden states (S, H), then the sampler (vocab-parallel at tp > 1);
        None where sample is False."""
        if self.model.parallel.communicates:  # vocab-parallel: candidates cross ranks, not rows
            return self._sample_local_logits(self.model.compute_logits(hidden, gather=False), rows, sample)
        if not sample:
            return None
        logits = self.model.compute_logits(hidden, out=self._logits_buffer(len(rows), hidden.dtype))  # (S, V)
        return sample_rows(self.sampler, logits, rows, self.vocab_limit)

    def _argmax_tokens(self, hidden: torch.Tensor) -> list[int]:
        """The argmax token of each row's logits over the tokenizer's ids, from hidden states (S, H).
        At tp > 1 each rank finds its slice's best (value, id) and one (S, 2) message per rank gives
        every rank the winner: the largest value, the lowest id on ties, as the whole row's argmax."""
        embed = self.model.embed
        values, ids = self.model.best_logits(hidden, min(self.vocab_limit or embed.vocab_size, embed.vocab_size))
        if not self.model.parallel.communicates:
            return ids.tolist()
        packed = torch.stack([values, ids.to(values.dtype)], dim=1)  # (S, 2); ids exact in fp32 below 2**24
        gathered = self._gather_last_dim(packed).view(len(ids), -1, 2)  # (S, tp, 2), ranks in id order
        best_rank = gathered[:, :, 0].argmax(dim=1)  # the first rank holding the maximum: the lowest id
        return gathered[torch.arange(len(ids)), best_rank, 1].long().tolist()

    def _share_tokens(self, result: SampleResult | None, count: int) -> SampleResult:
        """Rank 0's sampled tokens on every rank (each appends them to its persistent batch);
        the other ranks' results carry no logprobs."""
        parallel = self.model.parallel
        if not parallel.communicates:
            return result
        ids = torch.tensor(result.token_ids if result is not None else [0] * count, dtype=torch.int64)
        shared = parallel.broadcast_from_first(ids.to(self.device)).cpu().tolist()
        return result if result is not None else SampleResult(shared, [None] * count)

    def _logits_buffer(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A reused (rows, V_local) buffer for the LM head on CPU (a fresh one faults in its pages
        every step); its rows are overwritten by the next step, after this one's sampling."""
        if self.device.type != "cpu" or self.model.embed.cpu_kernel is not None:
            return None  # a kernel's LM head allocates its own result
        width = self.model.embed.weight.shape[0]
        buffer = self._logits
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != dtype:
            buffer = self._logits = torch.empty(max(rows, 64), width, dtype=dtype)
        return buffer[:rows]

    def _sample_local_logits(self, local: torch.Tensor, rows: Sequence[SamplingRow],
                             sample: bool) -> SampleResult | None:
        """Every rank: its vocabulary slice (S, V_local) of the logits; rank 0 (sample=True) gets
        the tokens. Ids at or past the tokenizer's vocabulary are never picked."""
        embed = self.model.embed
        limit = min(self.vocab_limit or embed.vocab_size, embed.vocab_size)
        if local.device.type != "cpu":
            local = local.float().cpu()
        return sample_vocab_parallel(local, rows, embed.vocab_start, limit, self._gather_last_dim,
                                     self.sampler if sample else None)

    def _gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' `x` side by side (on the collective's device, back on the host)."""
        return self.model.parallel.all_gather_last_dim(x.to(self.device)).cpu()

    @torch.inference_mode()
    def logits(self, steps: Sequence[StepInput]) -> torch.Tensor:
        """Logits (S, vocab) at the last new token of every step (no sampling; for tests/tools)."""
        if self.decode_graphs is not None and self.decode_graphs.fits(steps):
            return self.decode_graphs.run(steps).clone()
        hidden, meta = self._forward(steps)
        return self.model.compute_logits(hidden[meta.last_token_index])

    def _forward(self, steps: Sequence[StepInput]):
        query_lens = [len(s.token_ids) for s in steps]
        cached = [s.num_cached for s in steps]
        meta = build_attention_metadata(query_lens, cached, [s.block_table for s in steps], self.block_size,
                                        self.model.config.sliding_window, self.device,
                                        use_kernel=self.attention == "kernel", groups=self.kv_groups)
        ids = torch.tensor([t for s in steps for t in s.token_ids], dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions_of(query_lens, cached, self.device), self.kv_cache, meta)
        return hidden, meta


def _resolve_attention(attention: str, device: torch.device, block_size: int) -> str:
    """"auto" → "kernel" on CUDA when Triton is installed (and blocks are a power of two, as the
    kernel tiles them), else "gather"."""
    if attention not in ("auto", "gather", "kernel"):
        raise ValueError(f"attention must be auto, gather or kernel; got {attention!r}")
    power_of_two = block_size & (block_size - 1) == 0
    if attention == "kernel" and not power_of_two:
        raise ValueError(f"the paged-attention kernel needs a power-of-two block_size, got {block_size}")
    if attention != "auto":
        return attention
    if device.type != "cuda" or not power_of_two:
        return "gather"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "gather"
    return "kernel"

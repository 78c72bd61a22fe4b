"""Runs the one Gemma model on XLA devices (TPU; XLA's CPU backend in tests) with torch_xla SPMD.

The model is the same `GemmaForCausalLM` as on CPU/GPU, built with an SPMD `ParallelContext`:
each parameter holds every tensor-parallel rank's slice side by side, and `mark_sharding`
splits that dim over the mesh's "model" axis, so each device holds exactly the slice the
torch.distributed rank of the same index would. XLA inserts the collectives.

XLA compiles one graph per distinct input shape, so every call is padded to a bucket
(`engine.buckets`): decode calls batch all one-token rows, prefill calls run one prompt chunk.
Padded rows write their K/V to a scratch block past the real cache and are never read.
`warm_up()` runs every bucketed shape once at start-up, so no user request waits on a compile;
`compile_count()` reads torch_xla's metrics to prove it.

Multi-host slices: one process (Ray actor) per host runs this runner with the same plan each
step; the mesh spans every device of the slice (`torch_xla.runtime.global_runtime_device_count`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch

from gemma_dist.config import KVLayout
from gemma_dist.engine.buckets import GraphShape, ShapeBuckets
from gemma_dist.engine.llm_engine import kv_cache_bytes
from gemma_dist.engine.model_runner import StepInput, kv_bytes_per_token, sample_rows
from gemma_dist.model.attention import AttentionGroup, AttentionMetadata, KeyView, allocate_kv_cache, table_rows
from gemma_dist.model.gemma import GemmaForCausalLM
from gemma_dist.model.layers import ParallelContext
from gemma_dist.sampling import SampleResult, Sampler

log = logging.getLogger(__name__)
CACHE_DIR_ENV = "GEMMA_DIST_XLA_CACHE_DIR"  # persistent compilation cache (restarts skip compiles)
# Without an explicit max_model_len, XLA compiles context buckets up to this many tokens: every
# doubling adds a decode graph per batch size and a prefill graph per chunk size to warm-up.
DEFAULT_MAX_MODEL_LEN = 4096


def init_xla(cache_dir: str | None = None):
    """Start torch_xla in SPMD mode (once per process); returns the XLA device."""
    import torch_xla
    import torch_xla.runtime as xr

    if not getattr(init_xla, "done", False):
        cache_dir = cache_dir or os.environ.get(CACHE_DIR_ENV)
        if cache_dir:
            xr.initialize_cache(cache_dir, readonly=False)
        xr.use_spmd()
        init_xla.done = True
    return torch_xla.device()


def device_count() -> int:
    """XLA devices in the whole slice (every host's chips; virtual CPU devices in tests)."""
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


def compile_count() -> int:
    """Graphs XLA has compiled in this process so far (plus persistent-cache hits)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    hits = met.counter_value("PersistentCacheHit") or 0
    return (data[0] if data else 0) + hits


def default_tp(config, devices: int) -> int:
    """The most devices (a divisor of `devices`) the model's heads and MLP split evenly over;
    the rest of the mesh holds copies (e.g. Gemma 3 270M's 4 heads on an 8-chip host: tp 4 x 2)."""
    def splits(tp: int) -> bool:
        kv_ok = config.num_kv_heads % tp == 0 or tp % config.num_kv_heads == 0
        return config.num_heads % tp == 0 and config.intermediate_size % tp == 0 and kv_ok
    return max(tp for tp in range(1, devices + 1) if devices % tp == 0 and splits(tp))


def spmd_context(tp: int) -> ParallelContext:
    """The parallel context of an SPMD model sharded `tp` ways."""
    return ParallelContext(rank=0, size=tp, spmd=True)


class XlaModelRunner:
    """Owns the sharded model and paged KV cache on the XLA device; executes padded steps."""

    def __init__(self, model: GemmaForCausalLM, num_blocks: int, buckets: ShapeBuckets,
                 sampler: Sampler | None = None, vocab_limit: int | None = None, window_pool: bool = True):
        """num_blocks: blocks of positions for all layers; the cache holds num_blocks x G pages of
        one layer group each (gemma_dist.config.KVLayout; window_pool=False: one group)."""
        import torch_xla.distributed.spmd as xs

        self.device = init_xla()
        tp = model.parallel.size
        if not model.parallel.spmd and tp != 1:
            raise ValueError("an XLA model must be built with an SPMD ParallelContext (spmd_context(tp))")
        devices = device_count()
        if devices % tp:
            raise ValueError(f"tp {tp} must divide the {devices} XLA devices")
        # (replicas of the model, tp shards): weights split over "model", copied over "data".
        self.mesh = xs.Mesh(np.arange(devices), (devices // tp, tp), ("data", "model"))
        self.tp = tp
        self.model = model.to(self.device)
        self._shard_weights(xs)
        self.block_size = buckets.block_size
        self.num_blocks = num_blocks
        self.kv_layout = KVLayout.of(model.config, window_pool)
        self.kv_groups = self.kv_layout.num_groups  # block tables per sequence
        self.num_pages = num_blocks * self.kv_groups
        self.buckets = buckets
        self.sampler = sampler or Sampler()
        self.vocab_limit = vocab_limit
        self.scratch_block = self.num_pages  # one page past the real cache: padded rows write here
        self.kv_cache = self._allocate_cache(xs, self.num_pages + 1)
        # Materialize weights and cache now, so the first step's graph is a plain step graph.
        import torch_xla

        torch_xla.sync()
        self.warmed_shapes: set[GraphShape] = set()

    @classmethod
    def from_checkpoint(cls, checkpoint, dtype: str, tp: int | None, config, tokenizer_vocab: int,
                        warm_up: bool = True) -> "XlaModelRunner":
        """Load `checkpoint` sharded over `tp` devices (default: `default_tp`), size the KV cache from
        config.kv_cache_memory, and compile every bucketed shape (config: an EngineConfig)."""
        from gemma_dist.model.loading import load_model

        if getattr(config, "quantize", None) is not None:  # (ModelRunner refuses it on CUDA)
            raise ValueError(f"quantize={config.quantize!r} is a CPU mode, not for device 'xla'")
        init_xla()
        tp = tp or default_tp(checkpoint.config, device_count())
        model = load_model(checkpoint, dtype, "cpu", spmd_context(tp))
        max_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, model.config.max_position_embeddings)
        buckets = ShapeBuckets.for_limits(config.max_num_seqs, config.max_num_batched_tokens, max_len,
                                          config.block_size)
        per_block = kv_bytes_per_token(model, next(model.parameters()).dtype) * config.block_size
        num_blocks = kv_cache_bytes(config.kv_cache_memory, init_xla()) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} holds no block of {per_block} bytes")
        runner = cls(model, num_blocks, buckets, Sampler(config.seed),
                     vocab_limit=min(tokenizer_vocab, model.config.vocab_size), window_pool=config.kv_window_pool)
        if warm_up:
            runner.warm_up()
        return runner

    # ------------------------------------------------------------------ set-up

    def _shard_weights(self, xs) -> None:
        """Split each parallel layer's weight along its rank dim over the mesh's model axis."""
        if self.tp == 1:
            return
        for module in self.model.modules():
            dim = getattr(type(module), "split_dim", None)
            if dim is not None:
                spec = tuple("model" if d == dim else None for d in range(module.weight.dim()))
                xs.mark_sharding(module.weight, self.mesh, spec)

    def _allocate_cache(self, xs, pages: int):
        """Per layer (k, v): (pages, block_size, kv heads, head_dim), heads split over the mesh
        (layers of one slot of the KV layout share their tensors)."""
        c = self.model.config
        cache = allocate_kv_cache(c.num_layers, pages, self.block_size, self.model.num_kv_heads_per_rank,
                                  c.head_dim, next(self.model.parameters()).dtype, self.device, self.kv_layout)
        if self.tp > 1:
            for t in {id(t): t for pair in cache for t in pair}.values():
                xs.mark_sharding(t, self.mesh, (None, None, "model", None))
        return cache

    @torch.no_grad()  # torch_xla does not support inference tensors
    def warm_up(self) -> int:
        """Compile every bucketed shape now (dummy calls into the scratch block); returns how
        many graphs were compiled."""
        import time

        before, start = compile_count(), time.perf_counter()
        shapes = self.buckets.graph_shapes()
        for shape in shapes:
            self._run(_PaddedCall(shape, self.block_size, self.scratch_block, self.kv_groups))
        compiled = compile_count() - before
        log.info("XLA warm-up: %d shapes, %d graphs compiled in %.1fs", len(shapes), compiled,
                 time.perf_counter() - start)
        self.warmed_shapes = set(shapes)
        return compiled

    # ------------------------------------------------------------------ steps

    @torch.no_grad()  # torch_xla does not support inference tensors
    def execute(self, steps: Sequence[StepInput], sample: bool = True) -> SampleResult | None:
        """Run one engine step as padded calls; sample for the steps that ask (in step order)."""
        logits = self._step_logits(steps)
        rows = [i for i, s in enumerate(steps) if s.sampling is not None]
        if not sample:
            return None
        if not rows:
            return SampleResult(token_ids=[], logprobs=[])
        picked = torch.stack([logits[i] for i in rows])
        return sample_rows(self.sampler, picked, [steps[i].sampling for i in rows], self.vocab_limit)

    @torch.no_grad()  # torch_xla does not support inference tensors
    def logits(self, steps: Sequence[StepInput]) -> torch.Tensor:
        """Logits (S, vocab) on the host at the last new token of every step (tests/tools)."""
        logits = self._step_logits(steps, every_step=True)
        return torch.stack([logits[i] for i in range(len(steps))])

    def _step_logits(self, steps: Sequence[StepInput], every_step: bool = False) -> dict[int, torch.Tensor]:
        """Step index → host fp32 logits row, for the steps that sample (or all)."""
        wanted = {i for i, s in enumerate(steps) if every_step or s.sampling is not None}
        decode = [i for i, s in enumerate(steps) if len(s.token_ids) == 1]
        calls = [[i] for i, s in enumerate(steps) if len(s.token_ids) > 1]
        if decode:
            calls.insert(0, decode)
        out: dict[int, torch.Tensor] = {}
        for members in calls:
            call = self._padded_call([steps[i] for i in members])
            logits = self._run(call, fetch=any(i in wanted for i in members))
            if logits is not None:
                out.update((i, logits[row]) for row, i in enumerate(members) if i in wanted)
        return out

    def _run(self, call: "_PaddedCall", fetch: bool = False) -> torch.Tensor | None:
        """One compiled graph: forward, K/V writes and logits; host logits (rows, vocab) if fetched."""
        import torch_xla

        d = self.device
        tables = call.tables.to(d)  # (G, R, NB): both layer kinds gather every block, masked differently
        group = AttentionGroup(torch.arange(call.shape.rows * call.shape.query_len, device=d),
                               call.shape.rows, call.shape.query_len,
                               KeyView(tables, call.causal.to(d)), KeyView(tables, call.windowed.to(d)))
        last = call.last.to(d)
        meta = AttentionMetadata(call.slots.to(d), [group], None, last)
        hidden = self.model(call.ids.to(d), call.positions.to(d), self.kv_cache, meta)
        logits = self.model.compute_logits(hidden.index_select(0, last))  # (rows, vocab) fp32
        if self.tp > 1:
            # Gathered inside the graph: fetching a vocab-sharded output would compile a
            # replication program on every fetch.
            import torch_xla.distributed.spmd as xs

            xs.mark_sharding(logits, self.mesh, (None, None))
        # One graph per shape: the logits stay a graph output whether or not they are fetched.
        torch_xla.sync()
        return logits.cpu()[: call.real_rows] if fetch else None

    # ------------------------------------------------------------------ padding

    def _padded_call(self, steps: Sequence[StepInput]) -> "_PaddedCall":
        """Tensors for one call over `steps` (all decode rows, or one prefill chunk), padded."""
        bs = self.block_size
        blocks = max(math.ceil((s.num_cached + len(s.token_ids)) / bs) for s in steps)
        if len(steps[0].token_ids) == 1:
            shape = self.buckets.decode_shape(len(steps), blocks)
        else:
            shape = self.buckets.prefill_shape(len(steps[0].token_ids), blocks)
        if self.warmed_shapes and shape not in self.warmed_shapes:
            log.warning("XLA: %s was not warmed up; this call compiles a new graph", shape)
        call = _PaddedCall(shape, bs, self.scratch_block, self.kv_groups)
        for row, step in enumerate(steps):
            call.fill_row(row, step, self.model.config.sliding_window)
        call.real_rows = len(steps)
        return call


class _PaddedCall:
    """Host tensors of one padded call (R rows x Q query tokens, NB blocks of BS per row, G layer groups).

    A new call is all padding (warm-up uses it as is); `fill_row` writes the real rows.
    Padding rows/tokens sit at position 0 of the scratch block: their K/V land there, their
    queries see only scratch key 0 (so softmax stays finite), and their outputs are dropped.
    """

    def __init__(self, shape: GraphShape, block_size: int, scratch_block: int, groups: int = 1):
        r, q, nb = shape.rows, shape.query_len, shape.blocks
        self.shape = shape
        self.groups = groups
        self.block_size = block_size
        self.real_rows = 0
        self.ids = torch.zeros(r * q, dtype=torch.int64)
        self.positions = torch.zeros(r * q, dtype=torch.int64)
        self.slots = torch.full((groups, r * q), scratch_block * block_size, dtype=torch.int64)
        self.tables = torch.full((groups, r, nb), scratch_block, dtype=torch.int64)
        key_pos = torch.arange(nb * block_size)
        self.causal = (key_pos == 0).expand(r, q, -1).clone()  # (R, Q, NB*BS)
        self.windowed = self.causal.clone()
        self.last = torch.arange(r, dtype=torch.int64) * q  # (R,) flat index of each row's last token

    def fill_row(self, row: int, step: StepInput, window: int | None) -> None:
        """Write one sequence's new tokens, slots, block table and masks into row `row`."""
        q, bs, n = self.shape.query_len, self.block_size, len(step.token_ids)
        start = row * q
        positions = torch.arange(step.num_cached, step.num_cached + n)
        table = torch.tensor(table_rows(step.block_table, self.groups), dtype=torch.int64)  # (G, blocks)
        self.ids[start: start + n] = torch.tensor(step.token_ids, dtype=torch.int64)
        self.positions[start: start + n] = positions
        self.slots[:, start: start + n] = table[:, positions // bs] * bs + positions % bs
        used = min(len(step.block_table), self.shape.blocks)
        self.tables[:, row, :used] = table[:, :used]
        # Padded query tokens of a chunk reuse its last position: same (finite) mask row.
        q_pos = torch.full((q,), step.num_cached + n - 1, dtype=torch.int64)
        q_pos[:n] = positions
        key_pos = torch.arange(self.shape.blocks * bs)
        causal = key_pos[None, :] <= q_pos[:, None]  # (Q, NB*BS)
        self.causal[row] = causal
        self.windowed[row] = causal if window is None else causal & ((q_pos[:, None] - key_pos[None, :]) < window)
        self.last[row] = start + n - 1

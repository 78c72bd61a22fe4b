"""ShardWorker: one tensor-parallel rank of a replica, as a Ray actor.

It owns its shard of the weights (loaded slice by slice: it never materializes the full
model) and its shard of the paged KV cache, and joins the replica's torch.distributed group
(gloo on CPU, nccl on GPU) at a rendezvous port picked free by rank 0. Every step all ranks
run the same plan; rank 0 samples and returns token ids (never logits).

Each worker keeps the replica's requests in a persistent batch (tokens, block tables, sampling
parameters; rank 0 also their seeded generators), so a step's message carries only changes:
its size follows the number of scheduled sequences, not their context length.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from gemma_dist.engine.llm_engine import tune_gc_for_serving
from gemma_dist.engine.model_runner import ModelRunner, kv_bytes_per_token
from gemma_dist.engine.persistent_batch import PlanRunner
from gemma_dist.engine.step_plan import StepPlan
from gemma_dist.model.layers import ParallelContext, set_batch_invariant
from gemma_dist.model.loading import load_model, open_checkpoint
from gemma_dist.sampling import SampleResult, Sampler


COLLECTIVE_TIMEOUT_S = 300  # a rank stuck in a collective (its peer died) gives up after this


class ShardWorker:
    """Rank `rank` of a `world`-rank replica (wrap with ray.remote to make it an actor)."""

    def __init__(self, rank: int, world: int, model: str, dtype: str | None, variant: str | None, num_threads: int,
                 device: str = "auto"):
        from gemma_dist.config import default_dtype
        from gemma_dist.engine.llm_engine import resolve_device

        self.rank, self.world = rank, world
        self.device = resolve_device(device)  # on this actor's node: "auto" finds its GPU
        self.model_path, self.variant = model, variant
        self.dtype = dtype or default_dtype(self.device)
        torch.set_num_threads(max(1, num_threads))  # Ray sets OMP_NUM_THREADS=1 for fractional CPUs
        if os.environ.get("GEMMA_DIST_BATCH_INVARIANT") == "1":
            set_batch_invariant(True)
        self.runner: ModelRunner | None = None
        self.local = None  # a CPU group's shared-memory collectives (one host; set by start, else gloo alone)
        self.plans: PlanRunner | None = None  # the persistent batch over `runner`

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for the group's TCP rendezvous; asked of rank 0 only."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, master: str, port: int, kv_cache_bytes: int, block_size: int, seed: int | None,
              vocab_limit: int, config=None) -> int:
        """Join the group, load this rank's shard, allocate its KV cache; returns the block count.

        With device "xla" this actor owns its host's chips: no torch.distributed group; the model
        is sharded over every device of the slice by SPMD and compiled for `config`'s (an
        EngineConfig) bucketed shapes before this returns."""
        if self.device == "xla":
            return self._start_xla(kv_cache_bytes, block_size, seed, vocab_limit, config)
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://{master}:{port}", rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        if backend == "gloo" and self.world > 1 and os.environ.get("GEMMA_DIST_SHM_COLLECTIVES", "1") != "0":
            from gemma_dist.model.shm_group import SharedMemoryGroup

            self.local = SharedMemoryGroup.create(self.rank, self.world, dist.group.WORLD, COLLECTIVE_TIMEOUT_S)
        checkpoint = open_checkpoint(self.model_path, self.variant)
        try:
            model = load_model(checkpoint, self.dtype, device,
                               ParallelContext(self.rank, self.world, dist.group.WORLD, local=self.local))
        finally:
            checkpoint.source.close()
        per_block = kv_bytes_per_token(model, next(model.parameters()).dtype) * block_size
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv cache budget {kv_cache_bytes} holds no block of {per_block} bytes")
        self.runner = ModelRunner(model, num_blocks, block_size, Sampler(seed), vocab_limit=vocab_limit,
                                  max_model_len=getattr(config, "max_model_len", None),
                                  prepack=getattr(config, "prepack_weights", True),
                                  window_pool=getattr(config, "kv_window_pool", True),
                                  quantize=getattr(config, "quantize", None))
        self.plans = PlanRunner(self.runner, samples=self.rank == 0, grammar_tokenizer=self._grammar_tokenizer)
        tune_gc_for_serving()
        return num_blocks

    def _start_xla(self, kv_cache_bytes: int, block_size: int, seed: int | None, vocab_limit: int, config) -> int:
        import dataclasses

        from gemma_dist.engine.llm_engine import EngineConfig
        from gemma_dist.engine.xla_runner import XlaModelRunner

        config = dataclasses.replace(config or EngineConfig(), kv_cache_memory=kv_cache_bytes,
                                     block_size=block_size, seed=seed)
        checkpoint = open_checkpoint(self.model_path, self.variant)
        try:
            self.runner = XlaModelRunner.from_checkpoint(checkpoint, self.dtype, None, config, vocab_limit)
        finally:
            checkpoint.source.close()
        self.plans = PlanRunner(self.runner, samples=True, grammar_tokenizer=self._grammar_tokenizer)
        tune_gc_for_serving()
        return self.runner.num_blocks

    def _grammar_tokenizer(self):
        """llguidance's view of this model's vocabulary, for structured output (built on first use)."""
        from gemma_dist.structured import grammar_tokenizer

        if getattr(self, "_lltokenizer", None) is None:
            checkpoint = open_checkpoint(self.model_path, self.variant)
            try:
                self._lltokenizer = grammar_tokenizer(checkpoint.load_tokenizer(), checkpoint.config.vocab_size)
            finally:
                checkpoint.source.close()
        return self._lltokenizer

    def execute_plan(self, plan: StepPlan) -> SampleResult | None:
        """Apply one step's changes to this rank's persistent batch and run it; rank 0 returns
        the sampled tokens (with the seconds it spent), the other ranks None."""
        return self.plans.execute_plan(plan)

    def pid(self) -> int:
        """This worker's process id (for operators and fault tests)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def num_parameters(self) -> int:
        """Parameters this rank holds (its shard)."""
        return sum(p.numel() for p in self.runner.model.parameters())

    def collectives(self) -> str:
        """How this rank's collectives travel: "shared memory" (CPU ranks on one host), "gloo", "nccl",
        "none" (tp = 1) or "xla" (the compiler inserts them)."""
        if self.device == "xla":
            return "xla"
        if not dist.is_initialized() or self.world == 1:
            return "none"
        return "shared memory" if self.local is not None else dist.get_backend()

    def compile_count(self) -> int:
        """Graphs compiled in this actor so far (XLA only; 0 elsewhere)."""
        if self.device != "xla":
            return 0
        from gemma_dist.engine.xla_runner import compile_count

        return compile_count()

    def stop(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()

"""A Ray replica: `tp` ShardWorker actors plus one Coordinator actor in one placement group.

The coordinator runs the engine's scheduler, tokenizer and detokenizer; each step it sends
the small plan to every shard worker at once and gets token ids back from rank 0. The gateway
holds a `RayReplica` handle and streams a request's deltas from the coordinator.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import AsyncIterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gemma_dist.engine.llm_engine import AsyncLLMEngine, EngineConfig, EngineStats, LLMEngine, RequestDelta
from gemma_dist.engine.model_runner import StepInput
from gemma_dist.runtime import ReplicaFailure
from gemma_dist.runtime.worker import ShardWorker
from gemma_dist.sampling import SampleResult, SamplingParams


class RemoteRunner:
    """Runs each step on all shard workers at once; rank 0's sampled tokens are the result.

    Seeded requests' generators live on rank 0 (a generator must advance across steps), so
    only the seed travels, and finished requests are released there on the next step.
    """

    def __init__(self, workers: list, step_timeout: float = 120.0):
        self.workers = workers
        self.step_timeout = step_timeout  # watchdog: a step (a collective) hung longer fails the replica
        self._released: list[str] = []

    def execute(self, steps: list[StepInput]) -> SampleResult:
        """One step on every rank; blocks until they finish."""
        seeds, wire = {}, []
        for step in steps:
            if step.sampling is not None and step.sampling.generator is not None:
                seeds[step.request_id] = step.sampling.params.seed
                step = dataclasses.replace(step, sampling=dataclasses.replace(step.sampling, generator=None))
            wire.append(step)
        released, self._released = self._released, []
        refs = [w.execute.remote(wire, seeds, released) for w in self.workers]
        try:
            return ray.get(refs, timeout=self.step_timeout)[0]
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(f"step exceeded the {self.step_timeout:g}s watchdog (a hung collective?)") from e

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator (at the next step)."""
        self._released.append(request_id)


class Coordinator:
    """Per-replica engine (scheduler, tokenizer, detokenizer) driving the shard workers."""

    def __init__(self, model: str, variant: str | None, workers: list, num_blocks: int, config: EngineConfig,
                 step_timeout: float = 120.0):
        from gemma_dist.model.loading import open_checkpoint

        checkpoint = open_checkpoint(model, variant)
        tokenizer = checkpoint.load_tokenizer()
        checkpoint.source.close()
        engine = LLMEngine.with_runner(checkpoint.config, tokenizer, config, RemoteRunner(workers, step_timeout),
                                       num_blocks)
        self.engine = AsyncLLMEngine(engine)

    def ready(self) -> bool:
        """True once constructed (the workers are loaded before)."""
        return True

    async def generate(self, request_id: str, params: SamplingParams, engine_input: dict):
        """Stream a request's deltas (a Ray streaming generator)."""
        async for delta in self.engine.generate(request_id, params=params, **engine_input):
            yield delta

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks."""
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        """Engine counters."""
        return self.engine.stats()


class RayReplica:
    """Gateway-side handle of one replica: its placement group, shard workers and coordinator."""

    _names = itertools.count()

    def __init__(self, model: str, dtype: str | None, variant: str | None, tp: int, config: EngineConfig,
                 cpus_per_actor: float = 0.01, threads_per_worker: int = 1, name: str | None = None,
                 step_timeout: float = 120.0, device: str = "cpu", placement_timeout: float = 600.0):
        """tp: shard workers (tensor-parallel ranks; with device "xla", hosts of the slice, one
        actor per host owning all its chips). dtype None: the device's default.
        placement_timeout: seconds to wait for the cluster to fit the replica (GPUs, TPU hosts)
        before failing with the resources it asked for (an autoscaler may add nodes meanwhile)."""
        self.name = name or f"replica-{next(self._names)}"
        self.tp = tp
        self.device = device
        self.placement_timeout = placement_timeout
        self._spec = (model, dtype, variant, config, cpus_per_actor, threads_per_worker, step_timeout)
        self._in_flight = 0
        self._ready = False
        self.draining = False  # no new requests (being removed)
        self.rebuilds = 0
        self._build()

    def _build(self) -> None:
        """Create the placement group, the shard workers (loaded) and the coordinator."""
        model, dtype, variant, config, cpus, threads, step_timeout = self._spec
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        worker_bundle = {"CPU": cpus, **accelerator_bundle(self.device, nodes)}
        # XLA hosts of one slice go one per node; torch.distributed ranks pack onto few nodes.
        strategy = "SPREAD" if self.device == "xla" and self.tp > 1 else "PACK"
        bundles = [worker_bundle] * self.tp + [{"CPU": cpus}]
        self.placement = placement_group(bundles, strategy=strategy)
        try:
            ray.get(self.placement.ready(), timeout=self.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement)
            self.placement = None
            raise ReplicaFailure(
                f"{self.name}: the Ray cluster could not fit {self.tp} shard worker(s) of {worker_bundle} "
                f"({strategy}) within {self.placement_timeout:g}s; cluster resources: "
                f"{ray.cluster_resources()}") from None
        actor = ray.remote(max_restarts=0)(ShardWorker)
        gpus = worker_bundle.get("GPU", 0)
        self.workers = [actor.options(num_cpus=cpus, num_gpus=gpus, resources=_custom(worker_bundle),
                                      scheduling_strategy=self._bundle(rank)).remote(
            rank, self.tp, model, dtype, variant, threads, self.device) for rank in range(self.tp)]
        master, port = ray.get(self.workers[0].rendezvous.remote())
        vocab_limit = _vocab_limit(model, variant)
        kv_bytes = int(config.kv_cache_memory) if config.kv_cache_memory > 1 else 2 << 30
        blocks = ray.get([w.start.remote(master, port, kv_bytes, config.block_size, config.seed, vocab_limit, config)
                          for w in self.workers])
        self.coordinator = ray.remote(Coordinator).options(
            num_cpus=cpus, scheduling_strategy=self._bundle(self.tp), max_concurrency=1000).remote(
            model, variant, self.workers, min(blocks), config, step_timeout)
        ray.get(self.coordinator.ready.remote())
        self._ready = True

    def mark_failed(self) -> bool:
        """Take the replica out of rotation; True if it was serving (the caller then rebuilds it)."""
        was_ready, self._ready = self._ready, False
        return was_ready

    def rebuild(self) -> None:
        """Tear the broken replica down and start it again (blocking: run it off the event loop)."""
        self._teardown()
        self._build()
        self.rebuilds += 1

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.placement, placement_group_bundle_index=index)

    def is_ready(self) -> bool:
        """True while the replica takes new requests."""
        return self._ready and not self.draining

    def load(self) -> int:
        """Requests in flight through this handle."""
        return self._in_flight

    async def generate(self, request_id: str, params: SamplingParams, **engine_input) -> AsyncIterator[RequestDelta]:
        """Stream one request's deltas from the coordinator."""
        self._in_flight += 1
        finished = False
        coordinator = self.coordinator
        try:
            stream = coordinator.generate.options(num_returns="streaming").remote(request_id, params, engine_input)
            async for ref in stream:
                delta = await ref
                finished = delta.finish_reason is not None
                yield delta
        except ray.exceptions.RayError as e:
            if isinstance(e, ValueError):  # the engine's own bad-input error, re-raised by Ray
                raise
            raise ReplicaFailure(f"{self.name}: {type(e).__name__}") from e
        finally:
            self._in_flight -= 1
            if not finished:
                coordinator.abort.remote(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request."""
        self.coordinator.abort.remote(request_id)

    def stats(self) -> EngineStats:
        """The coordinator's engine counters."""
        return ray.get(self.coordinator.stats.remote())

    def num_parameters_per_rank(self) -> list[int]:
        """Parameters held by each shard worker."""
        return ray.get([w.num_parameters.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        self._ready = False
        self._teardown()

    def _teardown(self) -> None:
        for actor in [getattr(self, "coordinator", None), *getattr(self, "workers", [])]:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
        if getattr(self, "placement", None) is not None:
            remove_placement_group(self.placement)
            self.placement = None


def accelerator_bundle(device: str, nodes: list[dict]) -> dict:
    """Accelerator resources one shard worker reserves, given each live node's resources: a
    GPU per rank on cuda; on xla all TPU chips of a host (XLA:CPU test clusters have none)."""
    if device.startswith("cuda"):
        return {"GPU": 1}
    chips = max((int(n.get("TPU", 0)) for n in nodes), default=0)
    if device == "xla" and chips:
        return {"TPU": chips}
    return {}


def _custom(bundle: dict) -> dict:
    """The bundle's resources other than CPU/GPU (Ray's `resources=` option)."""
    return {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}


def _vocab_limit(model: str, variant: str | None) -> int:
    """Ids the tokenizer can decode (the embedding may have more rows)."""
    from gemma_dist.model.loading import open_checkpoint

    checkpoint = open_checkpoint(model, variant)
    try:
        return min(checkpoint.load_tokenizer().vocab_size, checkpoint.config.vocab_size)
    finally:
        checkpoint.source.close()

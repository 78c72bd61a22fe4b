"""A Ray replica: `tp` ShardWorker actors plus one Coordinator actor in one placement group.

The coordinator runs the engine's scheduler, tokenizer and detokenizer; each step it sends
a small plan (changes only, see gemma_dist.engine.step_plan) to every shard worker at once
and gets token ids back from rank 0. The gateway holds a `RayReplica` handle: requests go to
the coordinator in batches, and every step's deltas for all requests come back in one
message (`Coordinator.poll`), demultiplexed to the request streams in the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from typing import AsyncIterator

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gemma_dist.engine.llm_engine import AsyncLLMEngine, EngineConfig, EngineStats, EngineStoppedError, LLMEngine, \
    RequestDelta, tune_gc_for_serving
from gemma_dist.engine.step_plan import StepPlan
from gemma_dist.runtime import ReplicaFailure
from gemma_dist.runtime.worker import ShardWorker
from gemma_dist.sampling import SampleResult, SamplingParams

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # a poll with nothing to report returns after this long


class _RemoteStep:
    """A step running on every rank; `result()` waits for all of them (rank 0's tokens)."""

    def __init__(self, ref, timeout: float):
        self.ref, self.timeout = ref, timeout  # a list of actor-call refs, or one compiled-graph ref

    def result(self) -> SampleResult:
        """Rank 0's SampleResult; raises if a rank failed or the watchdog expired."""
        try:
            return ray.get(self.ref, timeout=self.timeout)[0]
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayChannelTimeoutError) as e:
            raise RuntimeError(f"step exceeded the {self.timeout:g}s watchdog (a hung collective?)") from e


DISPATCH_MODES = ("compiled-graph", "actor-calls")

# The step watchdog (--step-timeout). Its default is 3x the longest step a replica may legitimately
# run (a full prefill chunk at the longest context) at the slowest speed a shard is assumed to keep
# (a loaded, shared CPU; a busy accelerator), and at least STEP_TIMEOUT_FLOOR_S.
_SLOW_FLOPS = {"cpu": 20e9, "cuda": 2e12, "xla": 2e12}  # FLOP/s per shard
STEP_TIMEOUT_FLOOR_S = 30.0


def default_step_timeout(model_config, config: EngineConfig, device: str, tp: int) -> float:
    """Seconds after which a step (a collective) counts as hung, from the model and the step limits:
    matmul FLOPs of max_num_batched_tokens tokens, plus attention over max_model_len positions
    (a sliding-window layer's over its window and the chunk only), split over tp shards."""
    c = model_config
    tokens = config.max_num_batched_tokens
    context = min(config.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
    keys = [context if kind.value == "global" else min(context, (c.sliding_window or context) + tokens)
            for kind in c.layer_kinds]
    flops = 2 * c.num_params * tokens + sum(4 * c.num_heads * c.head_dim * tokens * k for k in keys)
    rate = _SLOW_FLOPS.get(device.split(":")[0], _SLOW_FLOPS["cpu"]) * tp
    return max(STEP_TIMEOUT_FLOOR_S, 3 * flops / rate)


def resolve_dispatch(dispatch: str, device: str) -> str:
    """"auto": a compiled graph where the model runs on an accelerator, actor calls on CPU.

    Reading a compiled graph's result busy-waits: the coordinator spins a whole core for as long
    as a step runs (measured: 99% of a core against 5-8% waiting on actor calls, 100 ms steps).
    Next to a GPU that core is free and the ~1 ms saved per step matters; on a CPU host the
    model needs every core, and a CPU step is long enough that 1 ms does not."""
    if dispatch == "auto":
        return "actor-calls" if device == "cpu" else "compiled-graph"
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be auto or one of {', '.join(DISPATCH_MODES)}, got {dispatch!r}")
    return dispatch


class RemoteRunner:
    """Runs each step plan on all shard workers at once; rank 0's sampled tokens are the result.

    Plans carry only changes, since every worker keeps the persistent batch. `submit` returns
    as soon as the plan is on its way, so the engine can postprocess the previous step
    meanwhile (one step in flight at a time; an actor runs its steps in order).

    dispatch "compiled-graph": a Ray Compiled Graph (`ray.dag`) over the workers' execute_plan,
    whose shared-memory channels cost ~0.25 ms a step against ~1.5 ms for plain actor calls to
    two workers (measured on a loaded 2-core host), but whose reader spins while it waits (see
    `resolve_dispatch`); "actor-calls": one actor call per worker per step. A graph that cannot
    be compiled falls back to actor calls, with a warning.
    """

    def __init__(self, workers: list, step_timeout: float = 120.0, dispatch: str = "compiled-graph"):
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}, got {dispatch!r}")
        self.workers = workers
        self.step_timeout = step_timeout  # watchdog: a step (a collective) hung longer fails the replica
        self.graph = self._compile() if dispatch == "compiled-graph" else None
        self.dispatch = "compiled-graph" if self.graph is not None else "actor-calls"

    def _compile(self):
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as plan:
                dag = MultiOutputNode([w.execute_plan.bind(plan) for w in self.workers])
            return dag.experimental_compile()
        except Exception as e:  # noqa: BLE001 - any failure leaves the plain calls, which always work
            log.warning("cannot compile the step graph (%s: %s); dispatching steps with actor calls",
                        type(e).__name__, e)
            return None

    def submit(self, plan: StepPlan) -> _RemoteStep:
        """Send one step to every rank."""
        if self.graph is not None:
            return _RemoteStep(self.graph.execute(plan), self.step_timeout)
        return _RemoteStep([w.execute_plan.remote(plan) for w in self.workers], self.step_timeout)

    def execute_plan(self, plan: StepPlan) -> SampleResult:
        """One step on every rank; blocks until they finish."""
        return self.submit(plan).result()


class Coordinator:
    """Per-replica engine (scheduler, tokenizer, detokenizer) driving the shard workers.

    An async actor: `submit` and `abort` take batches of requests, and `poll` hands a gateway
    channel every delta of its requests produced since its last call, in one message. Each
    channel (a gateway event loop) has its own outbox, so a poll left over from a closed loop
    never takes another channel's deltas; an outbox nobody polls for `STALE_CHANNEL_SECONDS` is
    dropped and its requests aborted."""

    STALE_CHANNEL_SECONDS = 60.0

    def __init__(self, model: str, variant: str | None, workers: list, num_blocks: int, config: EngineConfig,
                 step_timeout: float = 120.0, dispatch: str = "compiled-graph"):
        from gemma_dist.model.loading import open_checkpoint

        checkpoint = open_checkpoint(model, variant)
        tokenizer = checkpoint.load_tokenizer()
        checkpoint.source.close()
        self.runner = RemoteRunner(workers, step_timeout, dispatch)
        engine = LLMEngine.with_runner(checkpoint.config, tokenizer, config, self.runner, num_blocks)
        tune_gc_for_serving()
        self.engine = AsyncLLMEngine(engine)
        self._outboxes: dict[str, _Outbox] = {}

    def ready(self) -> str:
        """How steps reach the workers ("compiled-graph" or "actor-calls"), once constructed."""
        return self.runner.dispatch

    async def submit(self, channel: str, requests: list[tuple[str, SamplingParams, dict]]) -> None:
        """Add requests (request id, params, LLMEngine.add_request keyword arguments) for the
        gateway channel `channel`; their deltas, or their error (ValueError for bad input), come
        out of that channel's `poll`."""
        outbox = self._outbox(channel)
        for request_id, params, inputs in requests:
            outbox.open.add(request_id)
            try:
                self.engine.submit(request_id, lambda item, rid=request_id: outbox.put(rid, item),
                                   params=params, **inputs)
            except EngineStoppedError as error:
                outbox.put(request_id, error)

    async def abort(self, request_ids: list[str]) -> None:
        """Stop requests and free their blocks (each ends with an ABORTED delta)."""
        for request_id in request_ids:
            self.engine.abort(request_id)

    async def poll(self, channel: str, timeout: float = POLL_SECONDS) -> list[tuple[str, object]]:
        """Every (request id, delta or exception) of `channel`'s requests since its last poll, in
        order; waits up to `timeout` seconds for the first one."""
        outbox = self._outbox(channel)
        if not outbox.items:
            try:
                await asyncio.wait_for(outbox.news.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return outbox.take()

    def _outbox(self, channel: str) -> "_Outbox":
        now = time.monotonic()
        for name, stale in list(self._outboxes.items()):
            if name != channel and now - stale.touched > self.STALE_CHANNEL_SECONDS:
                del self._outboxes[name]  # its gateway loop is gone: stop what it left running
                for request_id in stale.open:
                    self.engine.abort(request_id)
        outbox = self._outboxes.get(channel)
        if outbox is None:
            outbox = self._outboxes[channel] = _Outbox()
        outbox.touched = now
        return outbox

    def stats(self) -> EngineStats:
        """Engine counters, with the step-phase times of the coordinator."""
        return self.engine.stats()


class _Outbox:
    """One gateway channel's undelivered items, on the coordinator's event loop."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []  # (request id, RequestDelta or exception)
        self.open: set[str] = set()  # requests without their last item yet
        self.news = asyncio.Event()
        self.touched = time.monotonic()  # last submit or poll

    def put(self, request_id: str, item: object) -> None:
        """A sink on the actor's event loop: queue one item for the next poll."""
        self.items.append((request_id, item))
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.open.discard(request_id)
        self.news.set()

    def take(self) -> list[tuple[str, object]]:
        """Everything queued so far."""
        self.touched = time.monotonic()
        self.news.clear()
        items, self.items = self.items, []
        return items


class _Channel:
    """The gateway's link to one coordinator, on one event loop: batches submissions and aborts
    into one actor call per loop iteration, and one poller demultiplexes the coordinator's
    per-step batches of deltas to the request streams."""

    def __init__(self, coordinator, name: str):
        self.coordinator = coordinator
        self.name = name
        self.id = uuid.uuid4().hex  # the coordinator keeps one outbox per channel
        self.loop = asyncio.get_running_loop()
        self.streams: dict[str, asyncio.Queue] = {}
        self._adds: list[tuple[str, SamplingParams, dict]] = []
        self._aborts: list[str] = []
        self._flush_scheduled = False
        self._poller: asyncio.Task | None = None
        self.failure: ReplicaFailure | None = None

    def open(self, request_id: str, params: SamplingParams, inputs: dict) -> asyncio.Queue:
        """Register a stream and send the request with this iteration's batch."""
        queue: asyncio.Queue = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(self.failure)
            return queue
        self.streams[request_id] = queue
        self._adds.append((request_id, params, inputs))
        self._schedule_flush()
        if self._poller is None or self._poller.done():
            self._poller = self.loop.create_task(self._poll_forever())
        return queue

    def close(self, request_id: str, abort: bool) -> None:
        """Forget a stream; `abort` also stops the request in the replica."""
        self.streams.pop(request_id, None)
        if abort and self.failure is None:
            self._aborts.append(request_id)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        adds, self._adds = self._adds, []
        aborts, self._aborts = self._aborts, []
        if adds:
            self.coordinator.submit.remote(self.id, adds)
        if aborts:
            self.coordinator.abort.remote(aborts)

    async def _poll_forever(self) -> None:
        """Move every delta batch into its streams until no stream is open (or the replica fails)."""
        while self.streams:
            try:
                items = await self.coordinator.poll.remote(self.id)
            except Exception as e:  # noqa: BLE001 - the coordinator is gone (actor died, node lost)
                self.fail(ReplicaFailure(f"{self.name}: {type(e).__name__}"))
                return
            for request_id, item in items:
                queue = self.streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(item)

    def fail(self, failure: ReplicaFailure) -> None:
        """End every open stream with `failure`."""
        self.failure = failure
        for queue in self.streams.values():
            queue.put_nowait(failure)
        self.streams.clear()


# --placement-strategy -> Ray's placement-group strategy for a replica's bundles.
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "STRICT_SPREAD"}


class RayReplica:
    """Gateway-side handle of one replica: its placement group, shard workers and coordinator."""

    _names = itertools.count()
    _replicas_on: collections.Counter = collections.Counter()  # node id -> this process's replicas there (rank 0)

    def __init__(self, model: str, dtype: str | None, variant: str | None, tp: int, config: EngineConfig,
                 cpus_per_actor: float = 0.01, threads_per_worker: int = 1, name: str | None = None,
                 step_timeout: float = 120.0, device: str = "cpu", placement_timeout: float = 600.0,
                 dispatch: str = "auto", placement_strategy: str | None = None):
        """tp: shard workers (tensor-parallel ranks; with device "xla", hosts of the slice, one
        actor per host owning all its chips). dtype None: the device's default.
        placement_timeout: seconds to wait for the cluster to fit the replica (GPUs, TPU hosts)
        before failing with the resources it asked for (an autoscaler may add nodes meanwhile).
        placement_strategy: "pack" (the shards on as few nodes as fit them) or "spread" (each shard
        on its own node, as TPU hosts or one-GPU nodes need); None: spread for a multi-host XLA
        slice, else pack."""
        self.name = name or f"replica-{next(self._names)}"
        self.tp = tp
        self.device = device
        self.placement_timeout = placement_timeout
        self.placement_strategy = placement_strategy or ("spread" if device == "xla" and tp > 1 else "pack")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {placement_strategy!r}")
        self._spec = (model, dtype, variant, config, cpus_per_actor, threads_per_worker, step_timeout)
        self.dispatch = resolve_dispatch(dispatch, device)  # how the coordinator should send steps (RemoteRunner)
        self.dispatch_in_use: str | None = None  # what it does (a graph that fails to compile: actor calls)
        self._in_flight = 0
        self._ready = False
        self.draining = False  # no new requests (being removed)
        self.rebuilds = 0
        self._current_channel: _Channel | None = None  # link to the coordinator (see _channel)
        self._build()

    def _build(self) -> None:
        """Create the placement group, the shard workers (loaded) and the coordinator."""
        model, dtype, variant, config, cpus, threads, step_timeout = self._spec
        alive = [n for n in ray.nodes() if n.get("Alive")]
        bundles = replica_bundles(self.tp, self.device, cpus, [n["Resources"] for n in alive])
        worker_bundle = bundles[-1]
        target = self._pack_target(bundles, alive) if self.placement_strategy == "pack" else None
        # Pack: on one node when one can hold the replica, the node holding fewest of this
        # gateway's replicas (so replicas spread over nodes); else as few nodes as hold it.
        strategy = "STRICT_PACK" if target is not None else PLACEMENT_STRATEGIES[self.placement_strategy]
        self.placement = placement_group(bundles, strategy=strategy, _soft_target_node_id=target)
        try:
            ray.get(self.placement.ready(), timeout=self.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement)
            self.placement = None
            raise ReplicaFailure(
                f"{self.name}: the Ray cluster could not fit {self.tp} shard worker(s) of {worker_bundle} "
                f"({strategy}) within {self.placement_timeout:g}s; cluster resources: "
                f"{ray.cluster_resources()}") from None
        self._node = placement_group_table(self.placement)["bundles_to_node_id"][0]  # rank 0's node
        RayReplica._replicas_on[self._node] += 1
        actor = ray.remote(max_restarts=0)(ShardWorker)
        gpus = worker_bundle.get("GPU", 0)
        self.workers = [actor.options(num_cpus=cpus, num_gpus=gpus, resources=_custom(worker_bundle),
                                      runtime_env={"env_vars": worker_env()},
                                      scheduling_strategy=self._bundle(rank)).remote(
            rank, self.tp, model, dtype, variant, threads, self.device) for rank in range(self.tp)]
        master, port = ray.get(self.workers[0].rendezvous.remote())
        vocab_limit = _vocab_limit(model, variant)
        kv_bytes = int(config.kv_cache_memory) if config.kv_cache_memory > 1 else 2 << 30
        blocks = ray.get([w.start.remote(master, port, kv_bytes, config.block_size, config.seed, vocab_limit, config)
                          for w in self.workers])
        # Its engine thread blocks on step results with ray.get, off the actor's event loop; Ray
        # warns about any ray.get in an async actor, so that warning is off here.
        self.coordinator = ray.remote(Coordinator).options(
            num_cpus=cpus, scheduling_strategy=self._bundle(0), max_concurrency=1000,
            runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}).remote(
            model, variant, self.workers, min(blocks), config, step_timeout, self.dispatch)
        self.dispatch_in_use = ray.get(self.coordinator.ready.remote())
        log.info("%s: %d shard worker(s) ready; steps go by %s", self.name, self.tp, self.dispatch_in_use)
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
        """Stream one request's deltas from the coordinator (engine_input: LLMEngine.add_request's
        keyword arguments). Bad input raises ValueError; a broken replica ReplicaFailure."""
        self._in_flight += 1
        finished = False
        channel = self._channel()
        deltas = channel.open(request_id, params, engine_input)
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, ValueError):  # the engine's own bad-input error
                    finished = True
                    raise item
                if isinstance(item, ReplicaFailure):
                    raise item
                if isinstance(item, BaseException):  # the engine stopped (a worker died, the watchdog)
                    raise ReplicaFailure(f"{self.name}: {item}") from item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._in_flight -= 1
            channel.close(request_id, abort=not finished)

    def _channel(self) -> _Channel:
        """The link to the current coordinator on the running event loop (new after a rebuild)."""
        loop = asyncio.get_running_loop()
        channel = self._current_channel
        if channel is None or channel.loop is not loop or channel.coordinator is not self.coordinator \
                or channel.failure is not None:
            channel = self._current_channel = _Channel(self.coordinator, self.name)
        return channel

    def abort(self, request_id: str) -> None:
        """Stop a request."""
        self.coordinator.abort.remote([request_id])

    def stats(self) -> EngineStats:
        """The coordinator's engine counters."""
        return ray.get(self.coordinator.stats.remote())

    def shard_nodes(self) -> list[str]:
        """The Ray node id each shard worker runs on, by rank."""
        return ray.get([w.node_id.remote() for w in self.workers])

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
        if getattr(self, "_node", None) is not None:
            RayReplica._replicas_on[self._node] -= 1
            self._node = None

    @classmethod
    def _pack_target(cls, bundles: list[dict], alive: list[dict]) -> str | None:
        """The node for a packed replica: among the alive nodes whose resources can hold all its
        bundles, the one where this process runs the fewest replicas; None when no single node
        can (it then spans nodes)."""
        need: dict[str, float] = collections.defaultdict(float)
        for bundle in bundles:
            for name, amount in bundle.items():
                need[name] += amount
        fitting = [n["NodeID"] for n in alive if all(n["Resources"].get(k, 0) >= v for k, v in need.items())]
        return min(fitting, key=lambda node: cls._replicas_on[node]) if fitting else None


def worker_env() -> dict[str, str]:
    """Environment of shard-worker processes: OpenMP's waiting policy of `gemma-dist serve`'s own
    environment, when one is set (OMP_WAIT_POLICY, GOMP_SPINCOUNT); else OpenMP's default (spin
    briefly, then sleep). Measured on a 2-core host (real Gemma 3 270M, 32 x (128 + 128) over gRPC,
    tp=1): PASSIVE 123 tok/s and 5.4 s to the first token (a prefill opens thousands of small
    parallel regions, each waking sleeping threads), the default 160 tok/s and 4.2 s, ACTIVE 158
    tok/s and 4.4 s while spinning every idle worker thread forever. A shorter spin than the default
    (GOMP_SPINCOUNT=3000 against libgomp's 300,000 rounds) cut the worker's CPU on the tiny overhead
    model (256 streams) by about 15%, but served the real 270M at 106-121 tok/s against 124-138 with
    the default, servers alternating bursts in one run: not adopted (bench/bench_ab.py compares such
    settings). Also GEMMA_DIST_MALLOC_TUNING (engine.model_runner.tune_malloc_for_tensors), so a
    setting reaches workers on every node of a cluster."""
    import os

    return {name: os.environ[name] for name in WORKER_ENV_NAMES if name in os.environ}


WORKER_ENV_NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GEMMA_DIST_MALLOC_TUNING")  # serve's, passed on


def replica_bundles(tp: int, device: str, cpus: float, nodes: list[dict]) -> list[dict]:
    """The placement-group bundles of one replica. Bundle 0 holds rank 0 and the coordinator (it
    talks to rank 0 most, and a strict spread then needs a node per shard, not one more); bundle r
    holds rank r. nodes: the alive nodes' resources (what an accelerator bundle looks like)."""
    worker = {"CPU": cpus, **accelerator_bundle(device, nodes)}
    return [{**worker, "CPU": 2 * cpus}] + [worker] * (tp - 1)


def request_capacity(replicas: int, tp: int, device: str, cpus: float = 0.01) -> None:
    """Ask Ray's autoscaler for the resources of `replicas` replicas (on a cluster that autoscales,
    nodes come up for them; elsewhere it changes nothing). Declarative: the latest call wins."""
    from ray.autoscaler.sdk import request_resources

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        request_resources(bundles=replica_bundles(tp, device, cpus, nodes) * replicas)
    except Exception as e:  # noqa: BLE001 - advisory: placement still waits up to --placement-timeout
        log.warning("could not ask the Ray autoscaler for %d replicas' resources: %s", replicas, e)


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

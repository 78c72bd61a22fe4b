"""The gRPC gateway: validates requests, routes each to a ready replica (the one most likely to
cache its prompt's prefix, or the least-loaded: server.routing), and
streams its deltas back. Serves gemma_dist.v1.GemmaService, grpc.health.v1.Health and server
reflection on a grpc.aio server."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import time
import uuid
from typing import AsyncIterator, Callable, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gemma_dist import beam_search
from gemma_dist.engine.llm_engine import RequestDelta
from gemma_dist.engine.sequence import FinishReason
from gemma_dist.runtime import ReplicaFailure
from gemma_dist.sampling import SamplingParams
from gemma_dist.server.autoscale import AutoscaleConfig, Autoscaler, Load
from gemma_dist.server.metrics import GatewayMetrics
from gemma_dist.server.routing import Router
from gemma_dist.server.validation import CheckedRequest, ServedModel, ValidationError, check_generate, check_length
from gemma_dist.v1 import gemma_pb2, gemma_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gemma_pb2.DESCRIPTOR.services_by_name["GemmaService"].full_name
MAX_MESSAGE_BYTES = 16 << 20  # bounds every request and response
DEADLINE_SLACK = 0.25  # seconds: see _deadline_passed
MAX_ABORT_IDS = 1000  # request ids per Abort call
_FINISH = {FinishReason.STOP: gemma_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: gemma_pb2.FINISH_REASON_LENGTH,
           FinishReason.ABORTED: gemma_pb2.FINISH_REASON_ABORTED}


class ServeError(Exception):
    """A request that cannot be served: the gRPC status code and a message naming the field or the
    limit (the HTTP front maps the code to its status)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Replica(Protocol):
    """What the gateway needs of a replica (runtime.local.LocalReplica, Ray replicas)."""

    name: str

    def is_ready(self) -> bool: ...

    def load(self) -> int: ...

    def generate(self, request_id: str, params: SamplingParams, **engine_input) -> AsyncIterator[RequestDelta]: ...


class GemmaServicer(gemma_pb2_grpc.GemmaServiceServicer):
    """gemma_dist.v1.GemmaService over a set of replicas."""

    def __init__(self, replicas: Sequence[Replica], served: ServedModel, tokenizer, variant: str, tp: int = 1,
                 max_queued_requests: int | None = None, queue_timeout: float | None = None,
                 metrics: GatewayMetrics | None = None, routing: str = "prefix"):
        self.replicas = list(replicas)
        self.router = Router(routing)  # "prefix" (cache-aware) or "least-loaded"
        self.metrics = metrics or GatewayMetrics()
        self.max_queued_requests = max_queued_requests  # admitted but no first token yet; None = unbounded
        self.queue_timeout = queue_timeout  # seconds a request may wait for its first token
        self.queued = 0
        self.ready_stats: dict = {}  # replica name -> EngineStats of the ready replicas, as of the last refresh
        self._rebuilds: set = set()  # background rebuilds of failed replicas
        self.served = served
        self.tokenizer = tokenizer
        self.variant = variant
        self.tp = tp
        self._ids = itertools.count()
        self._in_flight: dict[str, Replica] = {}  # request id → the replica streaming it (for Abort)
        self._sample_ids: dict[str, list[str]] = {}  # request id with n > 1 → its samples' ids
        self._aborted_samples: set[str] = set()  # samples (and beam steps) named by an Abort, started or not

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request, context):
        """The whole completion (with n > 1: sample 0 at the top level, all in `samples`)."""
        out, samples, completion_tokens = gemma_pb2.GenerateResponse(), {}, {}
        async for delta, checked, index in self._measured(self._deltas(request, context), "Generate", context):
            out.request_id = checked.request_id
            if checked.n == 1:
                _merge(out, delta)
                continue
            if index == 0:
                _merge(out, delta)
            _merge_sample(samples.setdefault(index, gemma_pb2.Sample(index=index)), delta)
            completion_tokens[index] = delta.completion_tokens
            if delta.finish_reason is not None:  # usage: the prompt once, every sample's tokens
                out.usage.prompt_tokens = delta.prompt_tokens
        if samples:
            out.samples.extend(samples[i] for i in sorted(samples))
            out.usage.completion_tokens = sum(completion_tokens.values())
        return out

    async def GenerateStream(self, request, context):
        """One response per delta (with its sample's index); each sample's last carries its
        finish_reason and usage."""
        async for delta, checked, index in self._measured(self._deltas(request, context), "GenerateStream", context):
            response = gemma_pb2.GenerateResponse(request_id=checked.request_id, index=index)
            _merge(response, delta)
            yield response

    async def _measured(self, deltas, method: str, context):
        """Pass a gRPC call's deltas through, recording latencies, tokens and its final status."""
        budget = context.time_remaining()  # the call's timeout as it reached us (None: no deadline)

        def code_of(error: BaseException) -> str:
            if isinstance(error, asyncio.CancelledError):  # the client went away, or its deadline passed
                return "DEADLINE_EXCEEDED" if _deadline_passed(budget, context.time_remaining()) else "CANCELLED"
            status = context.code()
            return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"

        async for item in self.measured(deltas, method, code_of):
            yield item

    async def measured(self, deltas, method: str, code_of: Callable[[BaseException], str]):
        """Pass (delta, ...) tuples through, recording latencies, tokens and the final status
        (`code_of` names it for an exception; shared by the gRPC and HTTP fronts)."""
        m, start, first_at, tokens, code = self.metrics, time.perf_counter(), None, 0, "OK"
        try:
            async for item in deltas:
                delta = item[0]
                now = time.perf_counter()
                if first_at is None and delta.token_ids:
                    first_at = now
                    m.time_to_first_token.observe(now - start)
                if delta.queue_seconds is not None:
                    m.queue_time.observe(delta.queue_seconds)
                tokens += len(delta.token_ids)
                yield item
            end = time.perf_counter()
            m.request_latency.observe(end - start)
            if first_at is not None and tokens > 1:
                m.time_per_output_token.observe((end - first_at) / (tokens - 1))
        except BaseException as error:
            code = code_of(error)
            raise
        finally:
            m.generated_tokens.inc(tokens)
            m.requests.labels(method, code).inc()

    async def refresh_metrics(self) -> None:
        """Update the per-replica gauges (stats may block on Ray, so off the event loop); a replica
        that cannot answer is treated as failed."""
        loop = asyncio.get_running_loop()
        ready = [r for r in self.replicas if r.is_ready()]
        self.metrics.replicas_ready.set(len(ready))
        fresh = {}
        for replica in ready:
            try:
                stats = await loop.run_in_executor(None, replica.stats)
            except Exception as e:  # the replica's coordinator is gone: watch, don't wait for a request
                self._on_replica_failure(replica, ReplicaFailure(f"{replica.name}: stats failed ({type(e).__name__})"))
                continue
            self.metrics.record_replica(replica.name, stats)
            fresh[replica.name] = stats
        self.ready_stats = fresh

    async def Abort(self, request, context):
        """Stop the named requests in flight (all samples of one with n > 1); returns those that were."""
        if len(request.request_ids) > MAX_ABORT_IDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_ids: at most {MAX_ABORT_IDS}, got {len(request.request_ids)}")
        aborted = []
        for request_id in dict.fromkeys(request.request_ids):
            samples = self._sample_ids.get(request_id)
            if samples is not None:  # n > 1 or a beam search: marked, so those not started never will
                self._aborted_samples.update(samples)
            found = samples is not None
            for sample_id in samples or (request_id,):
                replica = self._in_flight.get(sample_id)
                if replica is not None:
                    replica.abort(sample_id)
                    found = True
            if found:
                aborted.append(request_id)
        return gemma_pb2.AbortResponse(aborted=aborted)

    async def Tokenize(self, request, context):
        """Text → token ids."""
        await self._check_model(request.model, context)
        return gemma_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text, add_bos=request.add_bos))

    async def GetModelInfo(self, request, context):
        """What is served."""
        return gemma_pb2.ModelInfo(name=self.served.name, variant=self.variant, vocab_size=self.served.vocab_size,
                                   max_context=self.served.max_context, tp=self.tp,
                                   replicas_ready=sum(r.is_ready() for r in self.replicas))

    # ------------------------------------------------------------------ internals

    async def _check_model(self, name: str, context) -> None:
        if name and name != self.served.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name!r}; this server serves "
                                                           f"{self.served.name!r}")

    async def _deltas(self, request, context) -> AsyncIterator[tuple[RequestDelta, CheckedRequest, int]]:
        """A gRPC request's (delta, checked request, sample index); a ServeError ends the call with its status."""
        try:
            checked = self.check(request)
            remaining = context.time_remaining()
            deadline = time.time() + remaining if remaining is not None else None  # travels to the engine
            async for delta, index in self.serve_samples(checked, deadline):
                yield delta, checked, index
        except ServeError as e:
            await context.abort(e.code, e.message)

    async def serve_samples(self, checked: CheckedRequest, deadline: float | None) -> AsyncIterator[tuple[RequestDelta, int]]:
        """(delta, sample index) of a checked request's n samples, merged in arrival order: n
        requests for the same prompt (ids request_id-i, seed + i when seeded). Sample 0 goes first;
        the others start once it has its first token, on its replica, forked from it (its full
        blocks shared, its partial block copied) instead of computing the prompt n times. The first
        failure ends them all. Beam search (params.beam_width >= 1) goes to serve_beams."""
        if checked.params.beam_search:
            async for item in self.serve_beams(checked, deadline):
                yield item
            return
        if checked.n == 1:
            async for delta in self.serve(checked, deadline):
                yield delta, 0
            return
        samples = [_sample(checked, i) for i in range(checked.n)]
        self._sample_ids[checked.request_id] = [s.request_id for s in samples]
        queue: asyncio.Queue = asyncio.Queue()
        prefilled = asyncio.Event()  # sample 0 has its first token (or ended)

        async def pump(index: int, sample: CheckedRequest) -> None:
            try:
                if sample.request_id in self._aborted_samples:  # Abort came before it started
                    self._aborted_samples.discard(sample.request_id)
                    await queue.put((RequestDelta(sample.request_id, [], "", FinishReason.ABORTED, [],
                                                  len(sample.prompt_token_ids or ()), 0), index))
                    return
                async for delta in self.serve(sample, deadline):
                    prefilled.set()
                    await queue.put((delta, index))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put(e)
            finally:
                prefilled.set()
                await queue.put(None)

        async def the_rest() -> None:
            await prefilled.wait()
            tasks.extend(asyncio.ensure_future(pump(i, s)) for i, s in enumerate(samples) if i)

        tasks = [asyncio.ensure_future(pump(0, samples[0]))]
        starter = asyncio.ensure_future(the_rest())
        try:
            done = 0
            while done < len(samples):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self._aborted_samples.difference_update(self._sample_ids.pop(checked.request_id, ()))
            starter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(starter, *tasks, return_exceptions=True)

    async def serve_beams(self, checked: CheckedRequest,
                          deadline: float | None) -> AsyncIterator[tuple[RequestDelta, int]]:
        """(delta, index) of the best n beams of a beam search, one final delta each, best first.
        Each step runs every live beam as a single-token request (ids request_id-bSTEP-i) on the
        replicas, all at once; prefix routing and caching keep a beam's blocks where its last step
        ran. An Abort or a failed step ends the search."""
        prompt = checked.tokenize(self.tokenizer)
        params = checked.params
        search = beam_search.search_for(params, len(prompt), self.served.max_context,
                                        self.tokenizer.stop_token_ids(chat=checked.chat is not None), checked.n)
        per_step = beam_search.step_params(params)
        try:
            while not search.done:
                finals = None if self._beam_aborted(checked.request_id) else \
                    await self._beam_step(checked.request_id, search, prompt, per_step, deadline)
                if finals is None or self._beam_aborted(checked.request_id) or any(not d.logprobs for d in finals):
                    for index in range(checked.n):  # (a step aborted by the engine has no tokens)
                        yield RequestDelta(checked.request_id, [], "", FinishReason.ABORTED, [], len(prompt), 0), index
                    return
                search.advance([d.logprobs[0].top for d in finals])
        finally:
            self._aborted_samples.difference_update(self._sample_ids.pop(checked.request_id, ()))
        for index, beam in enumerate(search.best()):
            yield RequestDelta(checked.request_id, list(beam.token_ids), self.tokenizer.decode(beam.token_ids),
                               FinishReason(beam.finish_reason),
                               beam_search.token_logprobs(beam, params.logprobs) if params.logprobs else [],
                               len(prompt), len(beam.token_ids), cumulative_logprob=beam.cumulative_logprob), index

    async def _beam_step(self, request_id: str, search: beam_search.BeamSearch, prompt: list[int],
                         per_step: SamplingParams, deadline: float | None) -> list[RequestDelta]:
        """Run every live beam's single-token request at once; their final deltas, in beam order."""
        steps = [CheckedRequest(f"{request_id}-b{search.steps}-{i}", params=per_step,
                                prompt_token_ids=prompt + list(beam.token_ids)) for i, beam in enumerate(search.live)]
        self._sample_ids[request_id] = [step.request_id for step in steps]
        return await asyncio.gather(*(self._last_delta(step, deadline) for step in steps))

    def _beam_aborted(self, request_id: str) -> bool:
        """Whether Abort named a beam search (its current step's ids are marked)."""
        return bool(self._aborted_samples.intersection(self._sample_ids.get(request_id, ())))

    async def _last_delta(self, checked: CheckedRequest, deadline: float | None) -> RequestDelta:
        """The final delta of a request, with all its tokens and logprobs merged in."""
        tokens, logprobs, last = [], [], None
        async for last in self.serve(checked, deadline):
            tokens += last.token_ids
            logprobs += last.logprobs
        return dataclasses.replace(last, token_ids=tokens, logprobs=logprobs)

    def check(self, request: gemma_pb2.GenerateRequest) -> CheckedRequest:
        """Validate a request and tokenize its text once, here (the ids travel to the replica);
        ServeError naming the field when it is bad."""
        try:
            checked = check_generate(request, self.served, f"req-{uuid.uuid4().hex[:12]}")
            if checked.prompt_token_ids is None:
                check_length(len(checked.tokenize(self.tokenizer)), checked.params.max_tokens, self.served,
                             "chat" if checked.chat is not None else "prompt")
        except ValidationError as e:
            raise ServeError(grpc.StatusCode.NOT_FOUND if e.not_found else grpc.StatusCode.INVALID_ARGUMENT,
                             str(e)) from e
        except ValueError as e:  # e.g. the chat template's own checks
            raise ServeError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        return checked

    async def serve(self, checked: CheckedRequest, deadline: float | None) -> AsyncIterator[RequestDelta]:
        """A checked request's deltas from a replica (admission control, routing, one retry on
        another replica for a request that streamed nothing); ServeError when it cannot be served."""
        if self.max_queued_requests is not None and self.queued >= self.max_queued_requests:
            raise ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"queue full: {self.queued} requests are waiting (--max-queued-requests)")
        tried: set[str] = set()
        keys = self.router.keys(checked.prompt_token_ids)
        while True:  # a request that has streamed nothing yet is retried once on another replica
            replica = self._sibling(checked, tried) or self._pick(exclude=tried, keys=keys)
            if replica is None:
                raise ServeError(grpc.StatusCode.UNAVAILABLE, "no replica is ready")
            tried.add(replica.name)
            self.router.record(replica.name, keys)
            log.info("request %s → replica %s", checked.request_id, replica.name)
            streamed = False
            self._in_flight[checked.request_id] = replica
            try:
                async for delta in self._stream(replica, checked, deadline):
                    streamed = streamed or bool(delta.token_ids or delta.text)
                    yield delta
                return
            except ReplicaFailure as failure:
                self._on_replica_failure(replica, failure)
                if streamed or len(tried) > 1:
                    raise ServeError(grpc.StatusCode.UNAVAILABLE, f"replica failed mid-request ({failure})") from failure
            finally:
                if self._in_flight.get(checked.request_id) is replica:
                    del self._in_flight[checked.request_id]

    async def _stream(self, replica, checked: CheckedRequest, deadline: float | None):
        """One replica's deltas for the request, with the queue timeout on the first one."""
        stream = replica.generate(checked.request_id, checked.params, deadline=deadline, **checked.engine_input())
        try:
            self.queued += 1
            try:
                first = await asyncio.wait_for(anext(stream), timeout=self.queue_timeout)
            except asyncio.TimeoutError:
                raise ServeError(grpc.StatusCode.UNAVAILABLE, f"request waited over {self.queue_timeout:g}s for a "
                                                              "replica (--queue-timeout)") from None
            finally:
                self.queued -= 1
            yield first
            async for delta in stream:
                yield delta
        except ValueError as e:
            raise ServeError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        finally:
            await stream.aclose()  # a cancelled or expired call aborts the request in its replica

    def _on_replica_failure(self, replica, failure: Exception) -> None:
        """Take a failed replica out of rotation and rebuild it in the background."""
        log.error("replica %s failed: %s", replica.name, failure)
        self.router.forget(replica.name)  # a rebuilt replica starts with an empty cache
        mark_failed = getattr(replica, "mark_failed", None)
        if mark_failed is None or not mark_failed():
            return  # not rebuildable, or someone else already handles it
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(None, replica.rebuild)
        task.add_done_callback(lambda f: log.info("replica %s rebuilt", replica.name) if not f.exception()
                               else log.error("rebuilding %s failed: %s", replica.name, f.exception()))
        self._rebuilds.add(task)
        task.add_done_callback(self._rebuilds.discard)

    def _sibling(self, checked: CheckedRequest, exclude: set[str]) -> Replica | None:
        """For a sample forked from another (n > 1), the ready replica running that one, where it
        can start from its K/V; None otherwise."""
        replica = self._in_flight.get(checked.fork_of) if checked.fork_of is not None else None
        return replica if replica is not None and replica.is_ready() and replica.name not in exclude else None

    def _pick(self, exclude: set[str] = frozenset(), keys: Sequence[int] = ()) -> Replica | None:
        """The ready replica the router picks for a prompt with prefix `keys` (None if none is ready)."""
        return self.router.pick([r for r in self.replicas if r.is_ready() and r.name not in exclude], keys)


def _deadline_passed(budget: float | None, remaining: float | None) -> bool:
    """Whether a cancelled call was its deadline expiring. The client's clock starts before ours
    (the call spends time on the wire and in queues before its handler runs) and the client
    cancels when its own deadline passes, so a cancellation that comes within DEADLINE_SLACK of
    our deadline (at least 0.25 s, or a tenth of the call's timeout) is the deadline, not the user."""
    if budget is None or remaining is None:
        return False
    return remaining <= max(DEADLINE_SLACK, 0.1 * budget)


def _sample(checked: CheckedRequest, index: int) -> CheckedRequest:
    """Sample `index` of a request with n > 1: its own id, seed + index when seeded, n = 1; samples
    after the first start from sample 0's K/V where they land on its replica (fork_of)."""
    params = checked.params
    if params.seed is not None:
        params = dataclasses.replace(params, seed=params.seed + index)
    return dataclasses.replace(checked, request_id=f"{checked.request_id}-{index}", params=params, n=1,
                               fork_of=f"{checked.request_id}-0" if index else None)


def _merge_sample(sample: gemma_pb2.Sample | gemma_pb2.GenerateResponse, delta: RequestDelta) -> None:
    """Append a delta's text, tokens and logprobs to a sample (or a response); its finish_reason
    when it is the last."""
    sample.text += delta.text
    sample.token_ids.extend(delta.token_ids)
    sample.logprobs.extend(_logprobs(delta))
    if delta.finish_reason is not None:
        sample.finish_reason = _FINISH[delta.finish_reason]
    if delta.cumulative_logprob is not None:
        sample.cumulative_logprob = delta.cumulative_logprob


def _logprobs(delta: RequestDelta) -> list[gemma_pb2.TokenLogprobs]:
    return [gemma_pb2.TokenLogprobs(chosen=gemma_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
                                    top=[gemma_pb2.TokenLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in delta.logprobs]


def _merge(response: gemma_pb2.GenerateResponse, delta: RequestDelta) -> None:
    """Append a delta's text, tokens and logprobs; set finish_reason and usage when it is the last."""
    _merge_sample(response, delta)
    if delta.finish_reason is not None:
        response.usage.prompt_tokens = delta.prompt_tokens
        response.usage.completion_tokens = delta.completion_tokens


class Scaler:
    """Grows and shrinks a servicer's replica set, one change at a time: the Scale RPC and the
    autoscaler (gemma_dist.server.autoscale) both go through it."""

    def __init__(self, servicer: GemmaServicer, make_replica: Callable[[str], Replica] | None,
                 autoscale: AutoscaleConfig | None = None, on_desired: Callable[[int], None] | None = None):
        """make_replica: name -> a started replica (blocking; run off the loop). on_desired:
        n -> None, called before growing to n replicas (ask the cluster for their resources)."""
        self.servicer = servicer
        self.make_replica = make_replica
        self.autoscaler = Autoscaler(autoscale) if autoscale is not None and make_replica is not None else None
        self.on_desired = on_desired
        self.lock = asyncio.Lock()
        self._names = itertools.count(len(servicer.replicas))
        self._task: asyncio.Task | None = None  # the autoscaler's change in progress

    async def scale_to(self, count: int) -> int:
        """Grow or shrink to `count` replicas (new ones started, surplus ones drained first, the
        least loaded first); returns how many there are once done."""
        async with self.lock:
            self.servicer.metrics.replicas_desired.set(count)
            replicas = self.servicer.replicas
            loop = asyncio.get_running_loop()
            if count > len(replicas) and self.on_desired is not None:
                await loop.run_in_executor(None, self.on_desired, count)
            while len(replicas) < count:
                name = f"replica-{next(self._names)}"
                log.info("scaling up: starting %s", name)
                replicas.append(await loop.run_in_executor(None, self.make_replica, name))
            while len(replicas) > count:
                victim = min(replicas, key=lambda r: r.load())
                victim.draining = True  # no new requests; the in-flight ones finish
                log.info("scaling down: draining %s", victim.name)
                while victim.load() > 0:
                    await asyncio.sleep(0.05)
                replicas.remove(victim)
                self.servicer.router.forget(victim.name)
                self.servicer.metrics.forget_replica(victim.name)
                await loop.run_in_executor(None, victim.shutdown)
            return len(replicas)

    def tick(self, now: float) -> None:
        """One autoscaler observation (after the servicer refreshed its replicas' stats); starts a
        change in the background when the policy asks for one and none is in progress."""
        if self.autoscaler is None or self.lock.locked() or (self._task is not None and not self._task.done()):
            return
        stats = list(self.servicer.ready_stats.values())
        total = sum(s.total_blocks for s in stats)
        load = Load(ready=len(stats), waiting=sum(s.waiting for s in stats),
                    kv_use=sum(s.total_blocks - s.free_blocks for s in stats) / total if total else 0.0,
                    running=sum(s.running for s in stats), slots=min((s.max_num_seqs for s in stats), default=0))
        current = len(self.servicer.replicas)
        wanted = self.autoscaler.desired(now, load, current)
        self.servicer.metrics.replicas_desired.set(wanted)
        if wanted != current:
            log.info("autoscaler: %d -> %d replicas (%s)", current, wanted, load)
            self._task = asyncio.get_running_loop().create_task(self._autoscale(wanted))

    async def _autoscale(self, count: int) -> None:
        try:
            await self.scale_to(count)
        except Exception:  # e.g. a replica the cluster could not place within --placement-timeout
            log.exception("autoscaler: scaling to %d replicas failed; retrying after the cooldown", count)
            self.autoscaler.failed(time.monotonic())


class AdminServicer(gemma_pb2_grpc.AdminServiceServicer):
    """Live scaling by hand (the autoscaler, when on, may change it again later)."""

    def __init__(self, scaler: Scaler):
        self.scaler = scaler

    async def Scale(self, request, context):
        """Grow or shrink to request.replicas; returns once the change is done."""
        if request.replicas < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replicas: must be >= 1, got {request.replicas}")
        if self.scaler.make_replica is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server cannot start replicas")
        return gemma_pb2.ScaleResponse(replicas=await self.scaler.scale_to(request.replicas))


class MalformedRequest:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(message_type):
    """A deserializer that never raises: unparsable bytes become MalformedRequest, so the RPC can
    answer INVALID_ARGUMENT instead of grpc's generic INTERNAL."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, and friends
            return MalformedRequest(e)
    return parse


def _rejecting_malformed(method):
    """Wrap an RPC so a MalformedRequest is answered with INVALID_ARGUMENT."""
    async def reject(request, context):
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: cannot parse ({request.error}); "
                                                                 "string fields must be valid UTF-8")

    async def unary(request, context):
        await reject(request, context)
        return await method(request, context)

    async def streaming(request, context):
        await reject(request, context)
        async for item in method(request, context):
            yield item
    return streaming if inspect.isasyncgenfunction(method) else unary


def _service_handler(servicer: GemmaServicer) -> grpc.GenericRpcHandler:
    """GemmaService's method handlers, with lenient request parsing."""
    def unary(name, request_type, response_type):
        return grpc.unary_unary_rpc_method_handler(_rejecting_malformed(getattr(servicer, name)),
                                                   request_deserializer=_lenient(request_type),
                                                   response_serializer=response_type.SerializeToString)

    handlers = {
        "Generate": unary("Generate", gemma_pb2.GenerateRequest, gemma_pb2.GenerateResponse),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            _rejecting_malformed(servicer.GenerateStream), request_deserializer=_lenient(gemma_pb2.GenerateRequest),
            response_serializer=gemma_pb2.GenerateResponse.SerializeToString),
        "Tokenize": unary("Tokenize", gemma_pb2.TokenizeRequest, gemma_pb2.TokenizeResponse),
        "GetModelInfo": unary("GetModelInfo", gemma_pb2.GetModelInfoRequest, gemma_pb2.ModelInfo),
        "Abort": unary("Abort", gemma_pb2.AbortRequest, gemma_pb2.AbortResponse),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def start_server(servicer: GemmaServicer, host: str = "127.0.0.1", port: int = 50051,
                       server_credentials: grpc.ServerCredentials | None = None,
                       interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                       make_replica: Callable[[str], Replica] | None = None, autoscale: AutoscaleConfig | None = None,
                       on_desired: Callable[[int], None] | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the grpc.aio server (GemmaService, AdminService, health, reflection); returns it and
    its port. With `autoscale` (and `make_replica`), the autoscaler runs on each metrics refresh."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((_service_handler(servicer),))
    scaler = Scaler(servicer, make_replica, autoscale, on_desired)
    servicer.metrics.replicas_desired.set(len(servicer.replicas))
    gemma_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(scaler), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, gemma_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, server_credentials) if server_credentials
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    status = (health_pb2.HealthCheckResponse.SERVING if any(r.is_ready() for r in servicer.replicas)
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
    server.health = health  # for callers that update health later (replica failures)
    server.scaler = scaler
    server.metrics_task = asyncio.get_running_loop().create_task(_refresh_forever(servicer, health, scaler))
    return server, bound


async def _refresh_forever(servicer: GemmaServicer, health: HealthServicer, scaler: Scaler,
                           every: float = 1.0) -> None:
    """Keep the gauges and the health status fresh while the server runs (NOT_SERVING only while
    no replica is ready), and let the autoscaler look at each refresh."""
    while True:
        try:
            serving = any(r.is_ready() for r in servicer.replicas)
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
            await servicer.refresh_metrics()
            scaler.tick(time.monotonic())
        except Exception:  # a replica going away must not stop the metrics
            log.exception("refreshing metrics failed")
        await asyncio.sleep(every)

"""The gRPC gateway: validates requests, routes each to a ready replica (the one most likely to
cache its prompt's prefix, or the least-loaded: server.routing), and
streams its deltas back. Serves gemma_dist.v1.GemmaService, grpc.health.v1.Health and server
reflection on a grpc.aio server."""

from __future__ import annotations

import asyncio
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

from gemma_dist.engine.llm_engine import RequestDelta
from gemma_dist.engine.sequence import FinishReason
from gemma_dist.runtime import ReplicaFailure
from gemma_dist.sampling import SamplingParams
from gemma_dist.server.metrics import GatewayMetrics
from gemma_dist.server.routing import Router
from gemma_dist.server.validation import CheckedRequest, ServedModel, ValidationError, check_generate, check_length
from gemma_dist.v1 import gemma_pb2, gemma_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gemma_pb2.DESCRIPTOR.services_by_name["GemmaService"].full_name
MAX_MESSAGE_BYTES = 16 << 20  # bounds every request and response
DEADLINE_SLACK = 0.25  # seconds: see _deadline_passed
_FINISH = {FinishReason.STOP: gemma_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: gemma_pb2.FINISH_REASON_LENGTH,
           FinishReason.ABORTED: gemma_pb2.FINISH_REASON_ABORTED}


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
        self._rebuilds: set = set()  # background rebuilds of failed replicas
        self.served = served
        self.tokenizer = tokenizer
        self.variant = variant
        self.tp = tp
        self._ids = itertools.count()

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request, context):
        """The whole completion."""
        out = gemma_pb2.GenerateResponse()
        async for delta, checked in self._measured(self._deltas(request, context), "Generate", context):
            out.request_id = checked.request_id
            _merge(out, delta)
        return out

    async def GenerateStream(self, request, context):
        """One response per delta; the last carries finish_reason and usage."""
        async for delta, checked in self._measured(self._deltas(request, context), "GenerateStream", context):
            response = gemma_pb2.GenerateResponse(request_id=checked.request_id)
            _merge(response, delta)
            yield response

    async def _measured(self, deltas, method: str, context):
        """Pass deltas through, recording latencies, tokens and the call's final status."""
        m, start, first_at, tokens, code = self.metrics, time.perf_counter(), None, 0, "OK"
        budget = context.time_remaining()  # the call's timeout as it reached us (None: no deadline)
        try:
            async for delta, checked in deltas:
                now = time.perf_counter()
                if first_at is None and delta.token_ids:
                    first_at = now
                    m.time_to_first_token.observe(now - start)
                if delta.queue_seconds is not None:
                    m.queue_time.observe(delta.queue_seconds)
                tokens += len(delta.token_ids)
                yield delta, checked
            end = time.perf_counter()
            m.request_latency.observe(end - start)
            if first_at is not None and tokens > 1:
                m.time_per_output_token.observe((end - first_at) / (tokens - 1))
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            code = "DEADLINE_EXCEEDED" if _deadline_passed(budget, context.time_remaining()) else "CANCELLED"
            raise
        except BaseException:
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
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
        for replica in ready:
            try:
                stats = await loop.run_in_executor(None, replica.stats)
            except Exception as e:  # the replica's coordinator is gone: watch, don't wait for a request
                self._on_replica_failure(replica, ReplicaFailure(f"{replica.name}: stats failed ({type(e).__name__})"))
                continue
            self.metrics.record_replica(replica.name, stats)

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

    async def _deltas(self, request, context) -> AsyncIterator[tuple[RequestDelta, CheckedRequest]]:
        try:
            checked = check_generate(request, self.served, f"req-{uuid.uuid4().hex[:12]}")
            if checked.prompt_token_ids is None:  # tokenized once, here; the ids travel to the replica
                check_length(len(checked.tokenize(self.tokenizer)), checked.params.max_tokens, self.served,
                             "chat" if checked.chat is not None else "prompt")
        except ValidationError as e:
            code = grpc.StatusCode.NOT_FOUND if e.not_found else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except ValueError as e:  # e.g. the chat template's own checks
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.max_queued_requests is not None and self.queued >= self.max_queued_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"queue full: {self.queued} requests are waiting (--max-queued-requests)")
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None else None  # travels to the engine
        tried: set[str] = set()
        keys = self.router.keys(checked.prompt_token_ids)
        while True:  # a request that has streamed nothing yet is retried once on another replica
            replica = self._pick(exclude=tried, keys=keys)
            if replica is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is ready")
            tried.add(replica.name)
            self.router.record(replica.name, keys)
            log.info("request %s → replica %s", checked.request_id, replica.name)
            streamed = False
            try:
                async for delta in self._stream(replica, checked, deadline, context):
                    streamed = streamed or bool(delta.token_ids or delta.text)
                    yield delta, checked
                return
            except ReplicaFailure as failure:
                self._on_replica_failure(replica, failure)
                if streamed or len(tried) > 1:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica failed mid-request ({failure})")

    async def _stream(self, replica, checked: CheckedRequest, deadline: float | None, context):
        """One replica's deltas for the request, with the queue timeout on the first one."""
        stream = replica.generate(checked.request_id, checked.params, deadline=deadline, **checked.engine_input())
        try:
            self.queued += 1
            try:
                first = await asyncio.wait_for(anext(stream), timeout=self.queue_timeout)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"request waited over {self.queue_timeout:g}s for a replica (--queue-timeout)")
            finally:
                self.queued -= 1
            yield first
            async for delta in stream:
                yield delta
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
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


def _merge(response: gemma_pb2.GenerateResponse, delta: RequestDelta) -> None:
    """Append a delta's text, tokens and logprobs; set finish_reason and usage when it is the last."""
    response.text += delta.text
    response.token_ids.extend(delta.token_ids)
    for lp in delta.logprobs:
        response.logprobs.append(gemma_pb2.TokenLogprobs(
            chosen=gemma_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
            top=[gemma_pb2.TokenLogprob(token_id=t, logprob=p) for t, p in lp.top]))
    if delta.finish_reason is not None:
        response.finish_reason = _FINISH[delta.finish_reason]
        response.usage.prompt_tokens = delta.prompt_tokens
        response.usage.completion_tokens = delta.completion_tokens


class AdminServicer(gemma_pb2_grpc.AdminServiceServicer):
    """Live scaling: adds replicas from a factory, drains and removes surplus ones."""

    def __init__(self, servicer: GemmaServicer, make_replica: Callable[[str], Replica] | None):
        self.servicer = servicer
        self.make_replica = make_replica  # name → a started replica (blocking; run off the loop)
        self._lock = asyncio.Lock()
        self._names = itertools.count(len(servicer.replicas))

    async def Scale(self, request, context):
        """Grow or shrink to request.replicas; returns once the change is done."""
        if request.replicas < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replicas: must be >= 1, got {request.replicas}")
        if self.make_replica is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server cannot start replicas")
        async with self._lock:
            replicas = self.servicer.replicas
            loop = asyncio.get_running_loop()
            while len(replicas) < request.replicas:
                name = f"replica-{next(self._names)}"
                log.info("scaling up: starting %s", name)
                replicas.append(await loop.run_in_executor(None, self.make_replica, name))
            while len(replicas) > request.replicas:
                victim = min(replicas, key=lambda r: r.load())
                victim.draining = True  # no new requests; the in-flight ones finish
                log.info("scaling down: draining %s", victim.name)
                while victim.load() > 0:
                    await asyncio.sleep(0.05)
                replicas.remove(victim)
                self.servicer.router.forget(victim.name)
                await loop.run_in_executor(None, victim.shutdown)
            return gemma_pb2.ScaleResponse(replicas=len(replicas))


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
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def start_server(servicer: GemmaServicer, host: str = "127.0.0.1", port: int = 50051,
                       server_credentials: grpc.ServerCredentials | None = None,
                       interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                       make_replica: Callable[[str], Replica] | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the grpc.aio server (GemmaService, AdminService, health, reflection); returns it and its port."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((_service_handler(servicer),))
    gemma_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(servicer, make_replica), server)
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
    server.metrics_task = asyncio.get_running_loop().create_task(_refresh_forever(servicer, health))
    return server, bound


async def _refresh_forever(servicer: GemmaServicer, health: HealthServicer, every: float = 1.0) -> None:
    """Keep the gauges and the health status fresh while the server runs (NOT_SERVING only while
    no replica is ready)."""
    while True:
        try:
            serving = any(r.is_ready() for r in servicer.replicas)
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
            await servicer.refresh_metrics()
        except Exception:  # a replica going away must not stop the metrics
            log.exception("refreshing metrics failed")
        await asyncio.sleep(every)

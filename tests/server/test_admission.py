"""Admission control, deadlines and cancellation at the gateway (in-process replica, real gRPC).

Requests that must still be waiting at some moment are held there by a gate on the model's forward
(no step computes while it is closed), not by a prompt assumed to take long enough to prefill: how
long a prefill takes depends on the machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import grpc
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from tests.server.harness import running_gateway, wait_until

LONG = [2] + [1000 + (i * 37) % 5000 for i in range(3000)]  # a long prompt (it is never prefilled here)


class ForwardGate:
    """Holds every forward of one model while closed: requests are admitted but no step computes,
    on any machine. Installed on the instance, removed by `remove`."""

    def __init__(self, model):
        self.model = model
        self._open = threading.Event()
        self._open.set()
        forward = model.forward

        def gated(*args, **kwargs):
            self._open.wait()
            return forward(*args, **kwargs)

        model.forward = gated

    @contextlib.contextmanager
    def closed(self):
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def remove(self):
        self._open.set()
        del self.model.forward  # the class's forward again


@pytest.fixture
def gate(default_llm):
    g = ForwardGate(default_llm.model)
    yield g
    g.remove()


def replica(llm, kv_bytes: int = 256 << 20):
    return LocalReplica("r0", LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=kv_bytes,
                                                                              max_num_batched_tokens=512)))


def wait_idle(rep, seconds: float = 30.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        stats = rep.stats()
        if (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks):
            return stats
        time.sleep(0.1)
    return rep.stats()


def test_full_queue_fails_fast_and_queued_requests_complete(default_llm, gate):
    rep = replica(default_llm)
    with running_gateway([rep], default_llm, max_queued_requests=2) as server:
        target = f"127.0.0.1:{server.port}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with gate.closed():  # both requests are admitted and get no first token until it opens
                queued = [pool.submit(lambda i=i: Client(target, timeout=300).generate(
                    f"Story {i}:", temperature=0, max_tokens=2)) for i in range(2)]
                assert wait_until(lambda: rep.load() == 2), rep.load()
                with Client(target, timeout=30) as client:
                    with pytest.raises(grpc.RpcError) as info:
                        client.generate("Hi", max_tokens=1)
                # Refused while the queue could not move: it did not wait for a place in the queue.
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert not any(f.done() for f in queued)
            assert all(f.result().usage.completion_tokens == 2 for f in queued)
    assert wait_idle(rep).running == 0


def test_queue_timeout_is_unavailable(default_llm, gate):
    # While the gate is closed no request gets a first token, so this one waits out the 3 s queue
    # timeout on any machine; the short request afterwards has 3 s of headroom even on a loaded one.
    rep = replica(default_llm)
    with running_gateway([rep], default_llm, queue_timeout=3.0) as server:
        with Client(f"127.0.0.1:{server.port}", timeout=60, retries=0) as client:  # (no retry after the timeout)
            with gate.closed(), pytest.raises(grpc.RpcError) as info:
                client.generate("Once upon a time", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "queue-timeout" in info.value.details()
            assert wait_idle(rep).running == 0
            assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1


def test_cancelled_streams_and_expired_deadlines_free_everything(default_llm, gate):
    rep = replica(default_llm)
    with running_gateway([rep], default_llm) as server:
        target = f"127.0.0.1:{server.port}"

        def cancel_after_first_chunk(i):
            with Client(target, timeout=120) as client:
                call = client.generate_stream(f"Story {i}:", max_tokens=200, ignore_eos=True)
                next(call)
                call.cancel()

        def expire(i):
            # 0.5 s: long enough for the call to reach the gateway; the gate keeps it from a first token.
            with Client(target, timeout=0.5) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.generate(LONG, max_tokens=50)
                return info.value.code()

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(cancel_after_first_chunk, range(50)))
            with gate.closed():
                codes = list(pool.map(expire, range(20)))
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        stats = wait_idle(rep)
        assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks)
        from tests.server.test_metrics import scrape
        port = server.servicer.metrics.serve("127.0.0.1", 0)
        gauges = ("gemma_requests_running", "gemma_requests_waiting", "gemma_kv_blocks_used")
        # The gauges refresh every second (later on a loaded machine): wait for a refresh after the
        # requests ended (all three at 0 together); the asserts below say which one did not get there.
        def settled():
            m = scrape(port)
            return m if all(m.get((g, (("replica", "r0"),))) == 0 for g in gauges) else None

        metrics = wait_until(settled) or scrape(port)
        for gauge in gauges:
            assert metrics[(gauge, (("replica", "r0"),))] == 0, gauge
        generate_codes = {dict(labels)["code"]: value for (name, labels), value in metrics.items()
                          if name == "gemma_requests_total" and dict(labels).get("method") == "Generate"}
        # Every expired call the gateway saw counts as DEADLINE_EXCEEDED; on a loaded machine a call
        # can expire before its handler runs, and then the gateway never sees it at all.
        assert 15 <= generate_codes.get("DEADLINE_EXCEEDED", 0) <= 20, generate_codes
        assert set(generate_codes) <= {"DEADLINE_EXCEEDED", "CANCELLED", "OK"}, generate_codes
        with Client(target, timeout=60) as client:
            assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1


def test_expired_request_is_never_prefilled(default_llm):
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=256 << 20))
    engine.add_request("late", LONG, deadline=time.time() - 1)
    deltas = engine.step()
    assert [d.finish_reason.value for d in deltas] == ["aborted"] and deltas[0].completion_tokens == 0
    assert not engine.has_unfinished_requests and engine.runner.kv_cache is not None


def test_the_client_retries_unavailable_until_a_replica_is_ready(default_llm):
    """No replica is ready (UNAVAILABLE before anything is sent): Client retries with backoff and
    succeeds once one is; without retries the first UNAVAILABLE is the answer."""
    rep = replica(default_llm)
    rep.draining = True  # not ready
    with running_gateway([rep], default_llm) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, timeout=60, retries=0) as client, pytest.raises(grpc.RpcError) as info:
            client.generate("Hi", max_tokens=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "no replica" in info.value.details()
        threading.Timer(0.3, lambda: setattr(rep, "draining", False)).start()
        with Client(target, timeout=60, retries=4, retry_backoff=0.5) as client:
            assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1
        refused = server.servicer.metrics.requests.labels("Generate", "UNAVAILABLE")._value.get()
        assert refused >= 2  # the first client's call and at least one attempt of the second's
    with pytest.raises(ValueError, match="retries"):
        Client(target, retries=9)

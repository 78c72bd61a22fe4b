"""Admission control, deadlines and cancellation at the gateway (in-process replica, real gRPC)."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from tests.server.harness import running_gateway

LONG = [2] + [1000 + (i * 37) % 5000 for i in range(3000)]  # seconds of prefill on this CPU


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


def test_full_queue_fails_fast_and_queued_requests_complete(default_llm):
    rep = replica(default_llm)
    with running_gateway([rep], default_llm, max_queued_requests=2) as server:
        target = f"127.0.0.1:{server.port}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(lambda: Client(target, timeout=300).generate(LONG, temperature=0, max_tokens=2))
                      for _ in range(2)]
            time.sleep(0.5)  # both are admitted and still prefilling (no first token yet)
            with Client(target, timeout=30) as client:
                start = time.perf_counter()
                with pytest.raises(grpc.RpcError) as info:
                    client.generate("Hi", max_tokens=1)
                elapsed = time.perf_counter() - start
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and elapsed < 0.1
            assert all(f.result().usage.completion_tokens == 2 for f in queued)
    assert wait_idle(rep).running == 0


def test_queue_timeout_is_unavailable(default_llm):
    # 10,000 prompt tokens take well over the 3 s queue timeout to prefill on this CPU, while the
    # short request afterwards has 3 s of headroom even on a loaded machine.
    longer = [2] + [1000 + (i * 37) % 5000 for i in range(10_000)]
    rep = replica(default_llm, kv_bytes=512 << 20)  # room for the 10,000 tokens
    with running_gateway([rep], default_llm, queue_timeout=3.0) as server:
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(longer, max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "queue-timeout" in info.value.details()
            assert wait_idle(rep).running == 0
            assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1


def test_cancelled_streams_and_expired_deadlines_free_everything(default_llm):
    rep = replica(default_llm)
    with running_gateway([rep], default_llm) as server:
        target = f"127.0.0.1:{server.port}"

        def cancel_after_first_chunk(i):
            with Client(target, timeout=120) as client:
                call = client.generate_stream(f"Story {i}:", max_tokens=200, ignore_eos=True)
                next(call)
                call.cancel()

        def expire(i):
            # 0.5 s: long enough for the call to reach the gateway, far too short for LONG's prefill.
            with Client(target, timeout=0.5) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.generate(LONG, max_tokens=50)
                return info.value.code()

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(cancel_after_first_chunk, range(50)))
            codes = list(pool.map(expire, range(20)))
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        stats = wait_idle(rep)
        assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks)
        time.sleep(1.5)  # the metrics' gauges refresh every second
        from tests.server.test_metrics import scrape
        metrics = scrape(server.servicer.metrics.serve("127.0.0.1", 0))
        for gauge in ("gemma_requests_running", "gemma_requests_waiting", "gemma_kv_blocks_used"):
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

"""Prometheus metrics on the gateway agree with the requests sent (real gRPC and HTTP on loopback)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from tests.helpers import assert_greedy_agrees
from tests.server.harness import running_gateway, wait_until


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_match_the_requests_sent(default_llm):
    rep = LocalReplica("r0", LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20)))
    with running_gateway([rep], default_llm) as server:
        port = server.servicer.metrics.serve("127.0.0.1", 0)
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            client.generate("Hello", temperature=0, max_tokens=3)
            client.generate("World", temperature=0, max_tokens=4)
            assert sum(len(c.token_ids) for c in client.generate_stream("Hi", temperature=0, max_tokens=5)) == 5
            for bad in ({"prompt": ""}, {"prompt": "x", "top_p": 9.0}):
                with pytest.raises(grpc.RpcError):
                    client.generate(**bad)
        # Gauges refresh every second (later on a loaded machine): wait for one after the last request.
        # A call is counted when its handler ends, just after its status reached the client: wait for that too.
        def refreshed():
            m = scrape(port)
            ready = m.get(("gemma_kv_blocks_total", (("replica", "r0"),))) == rep.stats().total_blocks
            counted = sum(v for (name, _), v in m.items() if name == "gemma_requests_total") == 5
            return m if ready and counted and m.get(("gemma_requests_running", (("replica", "r0"),))) == 0 else None

        m = wait_until(refreshed) or scrape(port)
    assert m[("gemma_requests_total", (("code", "OK"), ("method", "Generate")))] == 2
    assert m[("gemma_requests_total", (("code", "OK"), ("method", "GenerateStream")))] == 1
    assert m[("gemma_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate")))] == 2
    assert m[("gemma_generated_tokens_total", ())] == 12
    for name in ("gemma_time_to_first_token_seconds", "gemma_request_latency_seconds", "gemma_queue_time_seconds",
                 "gemma_time_per_output_token_seconds"):
        assert m[(f"{name}_count", ())] == 3, name
    assert m[("gemma_replicas_ready", ())] == 1
    assert m[("gemma_requests_running", (("replica", "r0"),))] == 0
    assert m[("gemma_requests_waiting", (("replica", "r0"),))] == 0
    assert m[("gemma_kv_blocks_used", (("replica", "r0"),))] == 0
    assert m[("gemma_kv_blocks_total", (("replica", "r0"),))] == rep.stats().total_blocks
    for pool in ("global", "local"):  # the sliding-window pool's two kinds of pages, none held now
        assert m[("gemma_kv_pages_used", (("pool", pool), ("replica", "r0")))] == 0


def test_prefix_cache_gauges_count_a_repeated_prompt(default_llm):
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20))
    rep = LocalReplica("r0", engine)
    prompt = "Four score and seven years ago our fathers brought forth on this continent a new nation. " * 4
    with running_gateway([rep], default_llm) as server:
        port = server.servicer.metrics.serve("127.0.0.1", 0)
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            first = client.generate(prompt, temperature=0, max_tokens=2, logprobs=2)
            second = client.generate(prompt, temperature=0, max_tokens=2)
        # The hit computes only the last block: last bits may move, so tokens agree up to a near-tie.
        margins = [lp.top[0].logprob - lp.top[1].logprob for lp in first.logprobs]
        assert_greedy_agrees(list(second.token_ids), list(first.token_ids), margins, what="hit vs cold")
        n = first.usage.prompt_tokens
        label = (("replica", "r0"),)

        def refreshed():
            m = scrape(port)
            return m if m.get(("gemma_prefix_cache_queries_tokens", label)) == 2 * (n - 1) else None

        m = wait_until(refreshed) or scrape(port)
    assert m[("gemma_prefix_cache_queries_tokens", label)] == 2 * (n - 1)
    assert m[("gemma_prefix_cache_hits_tokens", label)] == (n - 1) // 16 * 16  # every full block before the last token
    assert m[("gemma_prefix_cache_hit_rate", label)] == pytest.approx((n - 1) // 16 * 16 / (2 * (n - 1)))
    assert m[("gemma_kv_blocks_cached", label)] >= (n - 1) // 16

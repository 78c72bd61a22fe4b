"""The gateway over two Ray replicas (real local Ray cluster, real gRPC on loopback)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from gemma_dist import SamplingParams  # noqa: E402
from gemma_dist.client import Client  # noqa: E402
from gemma_dist.engine.llm_engine import EngineConfig  # noqa: E402
from gemma_dist.runtime.replica import RayReplica  # noqa: E402
from tests.helpers import assert_greedy_agrees  # noqa: E402
from tests.server.harness import running_gateway  # noqa: E402

GOLDEN = {c["kind"]: c for c in json.loads(
    (Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def two_replica_server(ray_cluster, default_llm):
    config = EngineConfig(kv_cache_memory=128 << 20)
    replicas = [RayReplica("default", "float32", None, tp=1, config=config, name=f"ray-{i}") for i in range(2)]
    with running_gateway(replicas, default_llm) as server:
        yield server, replicas


def test_sixteen_concurrent_streams_each_equal_alone(two_replica_server, default_llm):
    server, replicas = two_replica_server
    kinds = ["prose", "code", "digits", "cjk", "non_english", "chat"] * 3
    requests = [(GOLDEN[k]["prompt"], 4 + (i * 3) % 13) for i, k in enumerate(kinds[:16])]
    # The in-process reference, each request alone, with its top-1 margin at every step: the replicas
    # (Ray actors, other torch thread counts, batched with the other streams) sum in other orders, so a
    # stream must equal it up to the reference's first near-tie, after which either token is right.
    alone = [default_llm.generate(p, SamplingParams(temperature=0, max_tokens=n, logprobs=2))[0] for p, n in requests]

    def stream(i):
        prompt, n = requests[i]
        with Client(f"127.0.0.1:{server.port}", timeout=300) as client:
            chunks, first_at = [], None
            for chunk in client.generate_stream(prompt, temperature=0, max_tokens=n):
                first_at = first_at or time.perf_counter()
                chunks.append(chunk)
            return chunks, first_at, time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    compared = 0
    for i, ((chunks, first_at, done_at), expected) in enumerate(zip(results, alone)):
        tokens = [t for c in chunks for t in c.token_ids]
        margins = [lp.top[0][1] - lp.top[1][1] for lp in expected.logprobs]
        compared += assert_greedy_agrees(tokens, expected.token_ids, margins, what=f"request {i}")
        assert "".join(c.text for c in chunks) == default_llm.tokenizer.decode(tokens)
        assert chunks[-1].usage.completion_tokens == len(tokens)
        assert first_at <= done_at
    assert compared >= 0.75 * sum(len(e.token_ids) for e in alone), compared  # not vacuous
    for replica in replicas:
        stats = replica.stats()
        assert (stats.running, stats.waiting, stats.free_blocks) == (0, 0, stats.total_blocks)


def test_requests_spread_across_both_replicas(two_replica_server):
    server, replicas = two_replica_server
    with Client(f"127.0.0.1:{server.port}", timeout=300) as client:
        assert client.model_info().replicas_ready == 2
    seen = set()
    originals = [r.generate for r in replicas]
    for replica, original in zip(replicas, originals):
        def spy(*args, _replica=replica, _original=original, **kwargs):
            seen.add(_replica.name)
            return _original(*args, **kwargs)
        replica.generate = spy
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def one(_):
                with Client(f"127.0.0.1:{server.port}", timeout=300) as client:
                    return list(client.generate_stream("Hello", temperature=0, max_tokens=6))
            list(pool.map(one, range(4)))
    finally:
        for replica, original in zip(replicas, originals):
            replica.generate = original
    assert seen == {"ray-0", "ray-1"}


def test_a_request_joining_mid_generation_gets_its_first_token_before_the_others_finish(two_replica_server):
    server, _ = two_replica_server
    target = f"127.0.0.1:{server.port}"
    streaming = threading.Barrier(3)  # both long streams have their first token, and the test goes on

    def long_stream():
        with Client(target, timeout=300) as client:
            stream = client.generate_stream(GOLDEN["prose"]["prompt"], temperature=0, max_tokens=60, ignore_eos=True)
            next(stream)
            streaming.wait(timeout=300)
            for _ in stream:
                pass
            return time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        longs = [pool.submit(long_stream) for _ in range(2)]
        streaming.wait(timeout=300)
        with Client(target, timeout=300) as client:
            first_chunk = next(client.generate_stream("Hi", temperature=0, max_tokens=2))
            first_token_at = time.perf_counter()
        finished_at = min(f.result() for f in longs)
    assert first_chunk.token_ids
    assert first_token_at < finished_at


@pytest.mark.parametrize("victim", ["shard worker", "coordinator"])
def test_killing_an_actor_mid_stream(ray_cluster, default_llm, victim):
    """A dead shard worker or a dead coordinator: affected requests end UNAVAILABLE or succeed
    through the retry; none hangs; the replica comes back and serves; requests to the other
    replica are unaffected."""
    import grpc

    config = EngineConfig(kv_cache_memory=128 << 20)
    replicas = [RayReplica("default", "float32", None, tp=1, config=config, name=f"f-{i}") for i in range(2)]
    with running_gateway(replicas, default_llm) as server:
        target = f"127.0.0.1:{server.port}"
        streaming = threading.Barrier(5)

        def stream(i):
            with Client(target, timeout=300, retries=0) as client:  # (the gateway's own retry is under test)
                call = client.generate_stream(f"Story {i}:", temperature=0, max_tokens=40, ignore_eos=True)
                tokens = 0
                try:
                    for chunk in call:
                        tokens += len(chunk.token_ids)
                        if tokens == len(chunk.token_ids):
                            streaming.wait(timeout=300)
                    return "ok" if tokens == 40 else f"short {tokens}"
                except grpc.RpcError as e:
                    return e.code().name

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i) for i in range(4)]
            streaming.wait(timeout=300)  # every stream has its first token
            ray.kill(replicas[0].workers[0] if victim == "shard worker" else replicas[0].coordinator)
            outcomes = [f.result(timeout=300) for f in futures]
        assert set(outcomes) <= {"ok", "UNAVAILABLE"} and "ok" in outcomes, outcomes
        deadline = time.time() + 300
        while not replicas[0].is_ready() and time.time() < deadline:
            time.sleep(1)
        assert replicas[0].is_ready() and replicas[0].rebuilds == 1
        replicas[1].draining = True  # route the next request to the rebuilt replica
        with Client(target, timeout=300) as client:
            assert client.generate("Hello", temperature=0, max_tokens=3).usage.completion_tokens == 3
        replicas[1].draining = False


def test_scale_one_two_one_under_steady_traffic(ray_cluster, default_llm):
    config = EngineConfig(kv_cache_memory=128 << 20)

    def make(name):
        return RayReplica("default", "float32", None, tp=1, config=config, name=name)

    with running_gateway([make("s-0")], default_llm, make_replica=make) as server:
        target = f"127.0.0.1:{server.port}"
        stop = threading.Event()
        results: list[str] = []

        def traffic():
            with Client(target, timeout=300) as client:
                while not stop.is_set():
                    try:
                        out = client.generate("Count: 1, 2, 3,", temperature=0, max_tokens=4)
                        results.append("ok" if out.usage.completion_tokens == 4 else "short")
                    except Exception as e:  # noqa: BLE001 (any failure counts)
                        results.append(repr(e))

        threads = [threading.Thread(target=traffic) for _ in range(2)]
        for t in threads:
            t.start()
        with Client(target, timeout=600) as admin:
            assert admin.scale(2) == 2 and admin.model_info().replicas_ready == 2
            time.sleep(2)
            assert admin.scale(1) == 1 and admin.model_info().replicas_ready == 1
            with pytest.raises(Exception, match="replicas: must be >= 1"):
                admin.scale(0)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert results and set(results) == {"ok"}, set(results)

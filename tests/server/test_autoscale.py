"""Autoscaling on a real gateway (gRPC on 127.0.0.1, in-process replicas of the real Gemma 3 270M):
a load ramp raises replicas_ready to max_replicas, idleness brings it back, and no request fails."""

from __future__ import annotations

import concurrent.futures
import time

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from gemma_dist.server.autoscale import AutoscaleConfig
from tests.server.harness import running_gateway, wait_until


def test_a_load_ramp_scales_to_max_and_idleness_back_to_min_without_a_failure(default_llm):
    def make_replica(name: str) -> LocalReplica:  # two sequences at a time: a burst must queue
        return LocalReplica(name, LLMEngine(default_llm.model, default_llm.tokenizer,
                                            EngineConfig(kv_cache_memory=32 << 20, max_num_seqs=2)))

    config = AutoscaleConfig(min_replicas=1, max_replicas=2, up_queue=2.0, window=1.0, cooldown=2.0)
    with running_gateway([make_replica("replica-0")], default_llm, make_replica=make_replica,
                         autoscale=config) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, timeout=300, retries=0) as client:
            assert client.model_info().replicas_ready == 1

            def one(i: int):
                with Client(target, timeout=300, retries=0) as c:
                    return c.generate(f"Story {i}:", temperature=0, max_tokens=48, ignore_eos=True)

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                ramp = [pool.submit(one, i) for i in range(12)]  # 10 wait behind 2 running: up
                assert wait_until(lambda: client.model_info().replicas_ready == 2, seconds=120)
                more = [pool.submit(one, 100 + i) for i in range(4)]  # the new replica takes some
                new_replica_steps = 0
                while not all(f.done() for f in ramp + more):
                    stats = server.servicer.ready_stats.get("replica-1")
                    new_replica_steps = max(new_replica_steps, stats.steps if stats else 0)
                    time.sleep(0.2)
                results = [f.result() for f in ramp + more]
            assert all(r.usage.completion_tokens == 48 for r in results)  # zero failed requests
            assert new_replica_steps > 0  # the new replica served
            assert wait_until(lambda: client.model_info().replicas_ready == 1, seconds=60)  # idle: down
            gauges = server.servicer.metrics.engine_steps._metrics  # the removed replica's are gone
            assert wait_until(lambda: set(gauges) == {(r.name,) for r in server.servicer.replicas})
            assert client.generate("Hi", temperature=0, max_tokens=2).usage.completion_tokens == 2
        metrics = server.servicer.metrics
        assert metrics.replicas_desired._value.get() == 1
        assert metrics.requests.labels("Generate", "OK")._value.get() == 17


def test_a_replica_that_cannot_be_started_is_given_up_and_retried_after_the_cooldown(default_llm):
    """min_replicas 2 with one running: the autoscaler asks for a second at once; the factory fails
    (as a replica Ray cannot place within --placement-timeout does): the server keeps serving on
    one, and the next try waits out the cooldown."""
    from gemma_dist.runtime import ReplicaFailure

    attempts: list[float] = []

    def unplaceable(name: str):
        attempts.append(time.monotonic())
        raise ReplicaFailure(f"{name}: the Ray cluster could not fit it within 0.1s")

    first = LocalReplica("replica-0", LLMEngine(default_llm.model, default_llm.tokenizer,
                                                EngineConfig(kv_cache_memory=32 << 20)))
    config = AutoscaleConfig(min_replicas=2, max_replicas=2, window=0.0, cooldown=2.0)
    with running_gateway([first], default_llm, make_replica=unplaceable, autoscale=config) as server:
        assert wait_until(lambda: len(attempts) >= 2, seconds=30)
        assert attempts[1] - attempts[0] >= 1.9  # one try per cooldown, not a tight loop
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            assert client.model_info().replicas_ready == 1
            assert client.generate("Hi", temperature=0, max_tokens=2).usage.completion_tokens == 2
        assert len(server.servicer.replicas) == 1

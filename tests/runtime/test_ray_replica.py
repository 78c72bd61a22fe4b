"""Ray replicas on a real local Ray cluster: tp=2 shard workers (gloo + shared memory) + a coordinator actor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from gemma_dist import SamplingParams  # noqa: E402
from gemma_dist.engine.llm_engine import EngineConfig  # noqa: E402
from gemma_dist.runtime.replica import RayReplica  # noqa: E402
from tests.helpers import stable_prefix  # noqa: E402

GOLDEN = {c["kind"]: c for c in json.loads(
    (Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def tp2_replica(ray_cluster):
    replica = RayReplica("default", "float32", None, tp=2, config=EngineConfig(kv_cache_memory=128 << 20))
    yield replica
    replica.shutdown()


async def collect(replica, prompt, params):
    return [d async for d in replica.generate("r-" + str(id(params)), params, prompt=prompt)]


def test_tp2_ray_replica_matches_the_reference(tp2_replica):
    case = GOLDEN["prose"]
    deltas = asyncio.run(collect(tp2_replica, case["prompt"], SamplingParams(temperature=0, max_tokens=16)))
    # tp=2 sums partial products in another order than transformers' single process: equal up to
    # the reference's first near-tie (prose has none: all 40 tokens are stable).
    assert [t for d in deltas for t in d.token_ids] == stable_prefix(case)[:16] and len(stable_prefix(case)) >= 16
    assert deltas[-1].finish_reason is not None and deltas[-1].completion_tokens == 16
    # Both CPU shard workers run on this host: their collectives go through shared memory, not gloo.
    assert ray.get([w.collectives.remote() for w in tp2_replica.workers]) == ["shared memory"] * 2


def test_argmax_rows_and_logprob_rows_share_a_tp2_step(tp2_replica):
    """Greedy rows without logprobs exchange one (value, id) per rank (the LM head's argmax path);
    rows with logprobs exchange candidates and log-norms. Run together in the same steps, both kinds
    give the reference tokens, and only the logprob rows carry logprobs."""
    async def both():  # four requests, each its own params object (collect names requests by it)
        return await asyncio.gather(*[collect(tp2_replica, GOLDEN[kind]["prompt"],
                                              SamplingParams(temperature=0, max_tokens=12, logprobs=logprobs))
                                      for kind in ("prose", "code") for logprobs in (0, 2)])

    runs = asyncio.run(both())
    for (plain, logprobs), kind in zip([runs[:2], runs[2:]], ("prose", "code")):
        want = stable_prefix(GOLDEN[kind])[:12]
        assert len(want) == 12
        assert [t for d in plain for t in d.token_ids] == want == [t for d in logprobs for t in d.token_ids]
        assert all(not d.logprobs for d in plain)
        chosen = [lp for d in logprobs for lp in d.logprobs]
        assert len(chosen) == 12 and all(lp.top[0][0] == lp.token_id for lp in chosen)


def test_each_rank_holds_only_its_shard(tp2_replica, default_llm):
    total = sum(p.numel() for p in default_llm.model.parameters())
    per_rank = tp2_replica.num_parameters_per_rank()
    assert len(per_rank) == 2 and max(per_rank) < 0.6 * total


def test_seeded_sampling_is_reproducible_across_the_ray_boundary(tp2_replica):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=42)
    first = asyncio.run(collect(tp2_replica, GOLDEN["code"]["prompt"], params))
    second = asyncio.run(collect(tp2_replica, GOLDEN["code"]["prompt"], params))
    tokens = lambda ds: [t for d in ds for t in d.token_ids]  # noqa: E731
    assert tokens(first) == tokens(second) and len(tokens(first)) == 10
    stats = tp2_replica.stats()
    assert (stats.running, stats.waiting, stats.free_blocks) == (0, 0, stats.total_blocks)


def test_a_forked_sample_copies_its_partial_block_on_every_shard(tp2_replica):
    """A second sample started from the first one's K/V (fork_of): both shards copy the partial
    block's pages, and it computes only the prompt's last token; greedy, both equal the reference."""
    case = GOLDEN["prose"]
    params = SamplingParams(temperature=0, max_tokens=16)
    before = tp2_replica.stats()

    async def parent_then_fork():
        parent = tp2_replica.generate("fork-parent", params, prompt=case["prompt"])
        first = await anext(parent)  # its prompt is computed
        child = [d async for d in tp2_replica.generate("fork-child", params, prompt=case["prompt"],
                                                       fork_of="fork-parent")]
        return [first] + [d async for d in parent], child

    parent, child = asyncio.run(parent_then_fork())
    after = tp2_replica.stats()
    taken = parent[-1].prompt_tokens - 1
    # (a prompt shorter than a block: the parent finds nothing cached, the fork copies all but one token)
    assert after.prefix_cache_hits - before.prefix_cache_hits == taken
    assert after.copied_pages - before.copied_pages == (after.kv_groups if taken % 16 else 0)
    tokens = lambda ds: [t for d in ds for t in d.token_ids]  # noqa: E731
    assert tokens(parent) == tokens(child) == stable_prefix(case)[:16]
    assert (after.running, after.waiting, after.free_blocks) == (0, 0, after.total_blocks)


def test_structured_output_holds_under_tensor_parallel_sampling(tp2_replica):
    """At tp=2 the logits are split by vocabulary; a constrained row gathers its whole row on rank 0,
    whose worker keeps the request's grammar state, next to a free row of the same step."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"], "additionalProperties": False}

    async def both():
        return await asyncio.gather(
            collect(tp2_replica, "A city as JSON:", SamplingParams(temperature=0.7, seed=3, max_tokens=64,
                                                                  json_schema=json.dumps(schema))),
            collect(tp2_replica, "Once upon a time", SamplingParams(temperature=0, max_tokens=8)))

    constrained, free = asyncio.run(both())
    assert constrained[-1].finish_reason.value == "stop", "".join(d.text for d in constrained)
    value = json.loads("".join(d.text for d in constrained))
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)
    assert constrained[-1].finish_reason.value == "stop" and free[-1].completion_tokens == 8


def test_engine_errors_cross_the_ray_boundary_as_value_errors(tp2_replica):
    async def bad():
        async for _ in tp2_replica.generate("bad", SamplingParams(max_tokens=2), prompt=""):
            pass

    with pytest.raises(ValueError, match="prompt must not be empty"):
        asyncio.run(bad())
    stats = tp2_replica.stats()
    assert (stats.running, stats.waiting) == (0, 0)


def test_a_stopped_shard_is_caught_by_the_step_watchdog_and_the_replica_rebuilds(ray_cluster):
    """SIGSTOP on rank 1 mid-stream: rank 0 waits in a collective that never completes; the step
    watchdog (--step-timeout) fails the replica within its timeout plus a margin, and a rebuilt
    replica serves again."""
    import os
    import signal
    import time

    from gemma_dist.runtime import ReplicaFailure

    replica = RayReplica("default", "float32", None, tp=2, config=EngineConfig(kv_cache_memory=64 << 20),
                         name="stopped", step_timeout=5.0)
    stopped: list[float] = []
    pid = ray.get(replica.workers[1].pid.remote())

    async def stream():
        try:
            async for delta in replica.generate("long", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
                                                prompt="Once upon a time"):
                if delta.token_ids and not stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(time.monotonic())
        except ReplicaFailure as failure:
            return time.monotonic() - stopped[0], str(failure)
        return None, "finished"

    try:
        waited, reason = asyncio.run(asyncio.wait_for(stream(), timeout=120))
        assert waited is not None and 4.0 <= waited <= 5.0 + 20.0, (waited, reason)  # 5 s watchdog + a margin
        assert "watchdog" in reason
        replica.rebuild()  # (the gateway does this when it sees the failure)
        deltas = asyncio.run(collect(replica, "Hello", SamplingParams(temperature=0, max_tokens=3)))
        assert sum(len(d.token_ids) for d in deltas) == 3
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # (killed by the rebuild; harmless if gone)
        except ProcessLookupError:
            pass
        replica.shutdown()


def test_a_replica_the_cluster_cannot_fit_fails_fast_naming_the_resources(ray_cluster):
    """--device cuda on a cluster without GPUs: a clear error, not a replica pending forever."""
    from gemma_dist.runtime import ReplicaFailure

    before = len(ray.util.placement_group_table())
    with pytest.raises(ReplicaFailure, match=r"could not fit 1 shard worker\(s\) of .*'GPU': 1"):
        RayReplica("default", None, None, tp=1, config=EngineConfig(kv_cache_memory=64 << 20),
                   device="cuda", placement_timeout=2)
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert len(states) >= before and states.count("PENDING") == 0  # its placement group was removed


def test_the_default_step_watchdog_follows_the_model_the_batch_and_the_device():
    """Not a fixed 120 s: 3x the longest legitimate step at a pessimistic speed, at least 30 s."""
    from gemma_dist.config import VARIANTS
    from gemma_dist.runtime.replica import STEP_TIMEOUT_FLOOR_S, default_step_timeout

    small, large = VARIANTS["gemma-3-270m"], VARIANTS["gemma-3-27b"]
    base = EngineConfig()
    cpu = default_step_timeout(small, base, "cpu", 1)
    assert cpu > 120  # a 2,048-token chunk at a 32k context is minutes of work on a slow CPU
    assert default_step_timeout(small, base, "cpu", 2) < cpu  # shards split the work
    assert default_step_timeout(small, EngineConfig(max_num_batched_tokens=8192), "cpu", 1) > 3 * cpu
    assert default_step_timeout(small, EngineConfig(max_model_len=4096), "cpu", 1) < cpu
    assert default_step_timeout(small, base, "cuda", 1) == STEP_TIMEOUT_FLOOR_S  # fast device: the floor
    assert default_step_timeout(large, base, "cuda", 1) > default_step_timeout(large, base, "cuda", 8)


def test_an_int8_tp2_replica_serves_the_in_process_int8_engines_tokens(ray_cluster, default_llm):
    """--quantize int8 through Ray: each shard worker quantizes its own slice. Greedy tokens equal
    the in-process int8 engine's up to its first step with a top-1 margin under 2 (tp=2 sums the
    row-parallel halves in another order; tests/model/test_tensor_parallel.py measures by how much)."""
    from gemma_dist.model.layers import set_cpu_kernels

    case = GOLDEN["digits"]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2)
    try:
        set_cpu_kernels(default_llm.model, quantize="int8")
        local = default_llm.generate([case["prompt"]], params)[0]
    finally:
        set_cpu_kernels(default_llm.model)  # the session's other tests expect the exact prepacked model
    margins = [lp.top[0][1] - lp.top[1][1] for lp in local.logprobs]
    stable = next((i for i, m in enumerate(margins) if m < 2.0), len(margins))
    assert stable >= 8, margins
    replica = RayReplica("default", "float32", None, tp=2, name="int8",
                         config=EngineConfig(kv_cache_memory=64 << 20, quantize="int8"))
    try:
        deltas = asyncio.run(collect(replica, case["prompt"], SamplingParams(temperature=0, max_tokens=stable)))
    finally:
        replica.shutdown()
    assert [t for d in deltas for t in d.token_ids] == local.token_ids[:stable]

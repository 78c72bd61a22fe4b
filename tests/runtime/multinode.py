"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), run as its own process by
tests/runtime/test_multinode.py (a process joins one Ray cluster, and the test session's is local).

    python -m tests.runtime.multinode  ->  one JSON line of what it saw

Three worker nodes of one CPU each and a head without CPUs (it only hosts the driver): a tp=2
replica placed with "spread" must put its shards on two different nodes and talk over a gloo
group between them. Then the node of rank 1 is removed while a request streams: the stream must
fail (not hang), and the replica must rebuild on the two nodes left and serve again. Last, two
tp=1 replicas placed with "pack" go to different nodes.
"""

from __future__ import annotations

import asyncio
import json
import time


async def _stream(replica, request_id: str, prompt: str, params, on_first=None) -> dict:
    """Tokens of one request, and how it ended ("ok" or the exception's type name)."""
    tokens, ended = [], "ok"
    try:
        async for delta in replica.generate(request_id, params, prompt=prompt):
            if not tokens and delta.token_ids and on_first is not None:
                on_first()
            tokens += delta.token_ids
    except Exception as error:  # noqa: BLE001 - reported
        ended = f"{type(error).__name__}: {error}"
    return {"tokens": tokens, "ended": ended}


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from gemma_dist import SamplingParams
    from gemma_dist.engine.llm_engine import EngineConfig
    from gemma_dist.runtime.replica import RayReplica

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    out: dict = {}
    replica = None
    try:
        replica = RayReplica("default", "float32", None, tp=2, config=EngineConfig(kv_cache_memory=64 << 20),
                             placement_strategy="spread", placement_timeout=120)
        out["shard_nodes"] = replica.shard_nodes()
        out["worker_nodes"] = [node.node_id for node in nodes]
        greedy = SamplingParams(temperature=0, max_tokens=16)
        out["greedy"] = asyncio.run(_stream(replica, "greedy", "The capital of France is", greedy))

        victim = next(node for node in nodes if node.node_id == out["shard_nodes"][1])
        started = time.monotonic()

        def remove_rank1_node():
            cluster.remove_node(victim, allow_graceful=False)

        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        out["removed"] = asyncio.run(_stream(replica, "long", "Once upon a time", long, remove_rank1_node))
        out["removed"]["seconds"] = time.monotonic() - started
        replica.rebuild()
        out["rebuilt_nodes"] = replica.shard_nodes()
        out["after"] = asyncio.run(_stream(replica, "again", "The capital of France is", greedy))
        replica.shutdown()
        packed = [RayReplica("default", "float32", None, tp=1, config=EngineConfig(kv_cache_memory=32 << 20),
                             placement_timeout=120) for _ in range(2)]  # two replicas, pack: one node each
        out["packed_nodes"] = [r.shard_nodes()[0] for r in packed]
        for r in packed:
            r.shutdown()
    finally:
        if replica is not None:
            replica.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), run as its own process by
tests/runtime/test_multinode.py (a process joins one Ray cluster, and the test session's is local).

    python -m tests.runtime.multinode  ->  one JSON line of what it saw

Three worker nodes of one CPU each and a head without CPUs (it only hosts the driver): a tp=2
replica placed with "spread" must put its shards on two different nodes and talk over a gloo
group between them. Then, behind a real gateway, the node of rank 1 is removed while a request
streams: the stream must end UNAVAILABLE (not hang), and the gateway must rebuild the replica on
the two nodes left and serve again. Last, two tp=1 replicas placed with "pack" go to different
nodes.
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


def _remove_a_node_behind_a_gateway(replica, cluster, victim) -> tuple[dict, list[str], list[int]]:
    """A stream through a real gateway (gRPC on 127.0.0.1) loses rank 1's node after its first
    token: how it ended and when; then the gateway's background rebuild, and a request served."""
    from types import SimpleNamespace

    import grpc

    from gemma_dist.client import Client
    from gemma_dist.model.loading import open_checkpoint
    from tests.server.harness import running_gateway, wait_until

    checkpoint = open_checkpoint("default")
    model = SimpleNamespace(config=checkpoint.config, tokenizer=checkpoint.load_tokenizer())
    checkpoint.source.close()
    with running_gateway([replica], model) as server, Client(f"127.0.0.1:{server.port}", timeout=300,
                                                              retries=0) as client:
        tokens, ended, started = 0, "ok", None
        try:
            for chunk in client.generate_stream("Once upon a time", temperature=0, max_tokens=400, ignore_eos=True):
                if not tokens and chunk.token_ids:
                    cluster.remove_node(victim, allow_graceful=False)
                    started = time.monotonic()
                tokens += len(chunk.token_ids)
        except grpc.RpcError as e:
            ended = e.code().name
        removed = {"tokens": tokens, "ended": ended, "seconds": time.monotonic() - started}
        back = wait_until(lambda: replica.is_ready() and replica.rebuilds == 1, seconds=300)
        removed["rebuilt_after"] = time.monotonic() - started if back else None
        after = list(client.generate("The capital of France is", temperature=0, max_tokens=16).token_ids)
        return removed, replica.shard_nodes(), after


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
        out["removed"], out["rebuilt_nodes"], out["after"] = _remove_a_node_behind_a_gateway(replica, cluster, victim)
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

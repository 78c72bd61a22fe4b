#!/usr/bin/env python
"""All-reduce latency between two CPU ranks: gloo over loopback TCP against the shared-memory
collectives (gemma_dist.model.shm_group) that CPU shard workers of one host use, same run.

Two processes, one torch thread each (as a tp=2 replica's shard workers on a 2-core host), on the
row-parallel output shapes of a decode step: one row of hidden 640 (Gemma 3 270M, one stream), 32
rows of 640, 64 and 256 rows of hidden 64 (the overhead bench's tiny model), and a 512-row prefill
chunk of 640. Each figure is the mean over `--calls` back-to-back calls after a warm-up.

With --replica it also serves the real Gemma 3 270M from a tp=2 Ray replica (fp32, one torch thread
per shard worker) both ways, each in its own Ray session (the switch is the workers' environment,
as `gemma-dist serve --tp-collectives` sets it): one stream and 8 concurrent streams of 64 greedy
tokens, output tok/s.

    .venv/bin/python bench/bench_shm_collectives.py [--calls 500] [--replica]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_serving import free_port  # noqa: E402

SHAPES = [(1, 640), (32, 640), (64, 64), (256, 64), (512, 640)]


def _rank(rank: int, port: int, calls: int, results) -> None:
    from gemma_dist.model.shm_group import SharedMemoryGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shared = SharedMemoryGroup.create(rank, 2, dist.group.WORLD, timeout_s=60)
    try:
        for shape in SHAPES:
            x = torch.randn(shape)
            row = [shape]
            for name, reduce in (("gloo", dist.all_reduce), ("shared memory", shared.all_reduce)):
                for _ in range(20):
                    reduce(x)
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    reduce(x)
                row.append((name, (time.perf_counter() - start) / calls * 1e6))
            if rank == 0:
                results.put(row)
    finally:
        if rank == 0:
            results.put(None)
        dist.destroy_process_group()


def replica_run(collectives: str) -> dict:
    """One Ray session: a real 270M tp=2 replica, its workers' collectives `collectives` (shm or
    gloo); output tok/s at 1 and 8 streams of 64 tokens."""
    import asyncio
    import os

    import ray

    from gemma_dist import SamplingParams
    from gemma_dist.engine.llm_engine import EngineConfig
    from gemma_dist.runtime.replica import RayReplica

    root = str(Path(__file__).resolve().parent.parent)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "PYTHONPATH": root, "GEMMA_DIST_SHM_COLLECTIVES": "1" if collectives == "shm" else "0"}})
    replica = RayReplica("default", "float32", None, tp=2, config=EngineConfig(kv_cache_memory=256 << 20),
                         threads_per_worker=1)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    async def stream(i: int) -> int:
        return sum([len(d.token_ids) async for d in replica.generate(f"r{i}", params, prompt="Once upon a time,")])

    async def streams(count: int) -> float:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*[stream(count * 100 + i) for i in range(count)]))
        return tokens / (time.perf_counter() - start)

    try:
        used = ray.get([w.collectives.remote() for w in replica.workers])
        asyncio.run(streams(1))  # warm-up
        return {"collectives": used[0], "1": asyncio.run(streams(1)), "8": asyncio.run(streams(8))}
    finally:
        replica.shutdown()
        ray.shutdown()


def replica_table() -> None:
    """The real 270M tp=2 replica, shared memory then gloo then shared memory again (the machine's drift)."""
    import json
    import subprocess

    runs = []
    for collectives in ("shm", "gloo", "shm"):
        out = subprocess.run([sys.executable, __file__, "--replica-run", collectives], capture_output=True,
                             text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    print("\nGemma 3 270M, tp=2 Ray replica (fp32, 1 thread per shard worker), 64 greedy tokens per stream; "
          "output tok/s\n")
    print("| shard workers' collectives | 1 stream | 8 streams |")
    print("|---|---|---|")
    for run in runs:
        print(f"| {run['collectives']} | {run['1']:.1f} | {run['8']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--replica", action="store_true", help="also a real 270M tp=2 Ray replica both ways")
    parser.add_argument("--replica-run", choices=["shm", "gloo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica_run:
        import json

        print(json.dumps(replica_run(args.replica_run)))
        return 0
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, port, args.calls, results)) for r in range(2)]
    for p in procs:
        p.start()
    rows = []
    while (row := results.get()) is not None:
        rows.append(row)
    for p in procs:
        p.join()
    print(f"\nall-reduce between 2 processes (1 torch thread each), fp32, mean of {args.calls} calls; microseconds\n")
    print("| shape | gloo (loopback TCP) | shared memory | gloo / shared memory |")
    print("|---|---|---|---|")
    for shape, (_, gloo), (_, shared) in rows:
        print(f"| {shape[0]} x {shape[1]} | {gloo:.1f} | {shared:.1f} | {gloo / shared:.0f}x |")
    if args.replica:
        replica_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())

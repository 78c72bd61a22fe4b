#!/usr/bin/env python
"""All-reduce latency between two CPU ranks: gloo over loopback TCP against the shared-memory
collectives (gemma_dist.model.shm_group) that CPU shard workers of one host use, same run.

Two processes, one torch thread each (as a tp=2 replica's shard workers on a 2-core host), on the
row-parallel output shapes of a decode step: one row of hidden 640 (Gemma 3 270M, one stream), 32
rows of 640, 64 and 256 rows of hidden 64 (the overhead bench's tiny model), and a 512-row prefill
chunk of 640. Each figure is the mean over `--calls` back-to-back calls after a warm-up.

    .venv/bin/python bench/bench_shm_collectives.py [--calls 500]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Soak: `gemma-dist serve` under churn for a while, then what is left of it.

N concurrent clients loop for T minutes against a server started here (the tiny random Gemma 3 of
bench_overhead, the real tokenizer, so steps are short and churn is high; or `--model default`).
Each request has a random prompt and output length; some are cancelled after a random delay, some
get a deadline shorter than they need, and halfway through one shard worker is killed (SIGKILL):
its replica is rebuilt while the others serve. At the end it prints requests by final status, the
resident memory of the gateway, coordinator and shard worker processes after warm-up (a tenth of
the run, before the kill) and at the end, every replica's KV-cache pages in use once the load has
stopped (all should be free), and how long the killed shard's replica took to serve again.

With --autoscale the server starts with one replica and --min-replicas 1 --max-replicas
--replicas (5 s window, 10 s cooldown): the load is a step from nothing, and it also reports the
time from that step to a second replica being ready.

    .venv/bin/python bench/soak.py [--minutes 3] [--streams 16] [--replicas 2] [--tp 1] [--model tiny]
                                   [--autoscale]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_overhead import WORDS, _process_tree, tiny_checkpoint  # noqa: E402
from bench.bench_serving import free_port, start_server, stop_server  # noqa: E402


def rss_by_role(root: int) -> dict[str, float]:
    """Resident MiB per role (gateway, coordinator, worker) in the server's process tree."""
    totals: dict[str, float] = collections.defaultdict(float)
    for pid, role in _process_tree(root).items():
        if role == "ray":
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        totals[role] += kib / 1024
    return dict(totals)


def kv_pages(metrics_port: int) -> dict[str, tuple[float, float]]:
    """replica -> (KV pages in use, pages) from the gateway's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    used, total = {}, {}
    for line in text.splitlines():
        for name, into in (("gemma_kv_blocks_used{", used), ("gemma_kv_blocks_total{", total)):
            if line.startswith(name):
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                into[replica] = float(line.rsplit(" ", 1)[1])
    return {r: (used.get(r, 0.0), total[r]) for r in total}


async def client_loop(stub, pb2, end: float, rng: random.Random, counts: collections.Counter) -> None:
    """Requests back to back until `end`: 10% cancelled after a random delay, 10% with a deadline
    too short to finish, the rest run to their end."""
    import grpc

    while time.monotonic() < end:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60)))
        request = pb2.GenerateRequest(prompt=words, sampling=pb2.SamplingParams(
            max_tokens=rng.randint(1, 128), temperature=rng.choice([0.0, 0.8]), ignore_eos=True))
        kind = rng.random()
        timeout = rng.uniform(0.05, 0.5) if kind < 0.1 else 120.0
        call = stub.GenerateStream(request, timeout=timeout)
        try:
            if 0.1 <= kind < 0.2:  # cancel after a random delay
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                call.cancel()
            async for _ in call:
                pass
            counts["OK" if not call.cancelled() else "CANCELLED"] += 1
        except asyncio.CancelledError:
            counts["CANCELLED"] += 1
        except grpc.RpcError as e:
            counts[e.code().name] += 1


async def ready_replicas(stub, pb2) -> int:
    return (await stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)).replicas_ready


async def watch(stub, pb2, events: dict, replicas: int, killed: asyncio.Event, began: float) -> None:
    """Record when `replicas` are first ready (autoscaling), and after the kill when one is down
    and when all are ready again."""
    down_seen = False
    while True:
        ready = await ready_replicas(stub, pb2)
        now = time.monotonic() - began
        if ready >= replicas and "all_ready" not in events:
            events["all_ready"] = now
        if killed.is_set():
            if ready < replicas and not down_seen:
                down_seen, events["down"] = True, now
            elif down_seen and ready >= replicas and "back" not in events:
                events["back"] = now
        await asyncio.sleep(0.5)


async def load(target: str, streams: int, seconds: float, seed: int, kill_at: float, kill, warm_at: float, warm,
               replicas: int) -> tuple[collections.Counter, dict]:
    import grpc

    from gemma_dist.v1 import gemma_pb2, gemma_pb2_grpc

    counts: collections.Counter = collections.Counter()
    events: dict = {}
    killed = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gemma_pb2_grpc.GemmaServiceStub(channel)
        began = time.monotonic()
        end = began + seconds
        loop = asyncio.get_running_loop()
        def kill_now():
            kill()
            killed.set()
            events["kill"] = time.monotonic() - began

        timers = [loop.call_later(warm_at, warm), loop.call_later(kill_at, kill_now)]
        watcher = asyncio.ensure_future(watch(stub, gemma_pb2, events, replicas, killed, began))
        try:
            await asyncio.gather(*(client_loop(stub, gemma_pb2, end, random.Random(seed + i), counts)
                                   for i in range(streams)))
        finally:
            for timer in timers:
                timer.cancel()
            watcher.cancel()
    return counts, events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--streams", type=int, default=16, help="concurrent clients")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--model", default="tiny", help="'tiny' (random, fast steps), 'default', or a path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autoscale", action="store_true",
                        help="start with one replica and autoscale to --replicas (reports the scale-up time)")
    args = parser.parse_args()

    from gemma_dist.model.loading.default_model import cache_root

    model = str(tiny_checkpoint(cache_root() / "bench-tiny-gemma3")) if args.model == "tiny" else args.model
    metrics_port = free_port()
    scaling = (("--replicas", "1", "--min-replicas", "1", "--max-replicas", str(args.replicas), "--scale-window", "5",
                "--scale-cooldown", "10") if args.autoscale else ("--replicas", str(args.replicas)))
    proc, target, _ = start_server(args.tp, model, "float32", "cpu", metrics_port,
                                   (*scaling, "--kv-cache-memory", str(256 << 20)), "soak_serve.log")
    killed: list[str] = []
    warm_rss: dict[str, float] = {}
    try:
        time.sleep(2)  # the first gauges

        def kill_a_shard():
            workers = [pid for pid, role in _process_tree(proc.pid).items() if role == "worker"]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(f"pid {workers[0]} at {time.strftime('%H:%M:%S')}")

        seconds = args.minutes * 60
        began = time.monotonic()
        counts, events = asyncio.run(load(target, args.streams, seconds, args.seed, seconds / 2, kill_a_shard,
                                          seconds / 10, lambda: warm_rss.update(rss_by_role(proc.pid)),
                                          args.replicas))
        wall = time.monotonic() - began
        time.sleep(3)  # in-flight aborts land, the gauges refresh
        end_rss = rss_by_role(proc.pid)
        pages = kv_pages(metrics_port)
    finally:
        stop_server(proc)

    print(f"\nsoak: {args.streams} streams x {wall / 60:.1f} min, {args.replicas} replica(s) x tp={args.tp}, "
          f"model {args.model}; shard killed: {', '.join(killed) or 'none'}\n")
    print("| final status | requests |\n|---|---|")
    for status, count in counts.most_common():
        print(f"| {status} | {count} |")
    print(f"| total | {sum(counts.values())} |\n")
    print("| processes | RSS after warm-up (MiB) | RSS at the end (MiB) | change |\n|---|---|---|---|")
    for role in ("gateway", "coordinator", "worker"):
        before, after = warm_rss.get(role, 0.0), end_rss.get(role, 0.0)
        change = f"{(after - before) / before * 100:+.1f}%" if before else "n/a"
        print(f"| {role} (all, sum) | {before:.0f} | {after:.0f} | {change} |")
    print("\n| event | seconds into the run |\n|---|---|")
    for name, label in (("all_ready", f"{args.replicas} replica(s) ready"), ("kill", "shard killed"),
                        ("down", "its replica seen out of rotation"), ("back", "all replicas ready again")):
        print(f"| {label} | {events[name]:.1f} |" if name in events else f"| {label} | not seen |")
    print("\n| replica | KV pages in use at the end | pages |\n|---|---|---|")
    for replica, (used, total) in sorted(pages.items()):
        print(f"| {replica} | {used:.0f} | {total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

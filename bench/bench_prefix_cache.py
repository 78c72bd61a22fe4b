#!/usr/bin/env python
"""Prefix caching, served: time to first token of requests that share a long prefix, with the
cache on (the default) and off (`--no-prefix-caching`), in one run.

Starts `gemma-dist serve` (tp=1, default model, fp32) twice, as users do. Each time it sends N
requests one after another over gRPC: the same P-token prefix (random ordinary tokens, BOS first)
followed by a different S-token suffix each, O output tokens (greedy). Reports time to first token
of request 1 (nothing cached yet) and of requests 2..N (p50 and max), the ratio off/on, the
replica's prefix-cache hit rate from /metrics, and whether both servers returned the same tokens.

Then routing: `gemma-dist serve --replicas 2` under `--routing prefix` and `--routing least-loaded`,
4 system prompts of P tokens, R requests interleaved (family i % 4, new suffix each), sent in
waves of W concurrent requests; reports the replicas' prefix-cache hit rate and each replica's
share of the requests.

    .venv/bin/python bench/bench_prefix_cache.py [--requests 16] [--prefix-len 1024] [--suffix-len 32]
                                                 [--routing-requests 32] [--routing-wave 4]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import prompts  # noqa: E402
from bench.bench_serving import free_port, start_server, stop_server  # noqa: E402
from gemma_dist.bench import percentile  # noqa: E402


def ttft_and_tokens(target: str, prompt: list[int], output_len: int) -> tuple[float, list[int]]:
    """(seconds from the call to its first streamed token, all tokens) of one streaming request."""
    from gemma_dist.client import Client

    with Client(target, timeout=600) as client:
        start, first, tokens = time.perf_counter(), None, []
        for chunk in client.generate_stream(prompt, temperature=0, max_tokens=output_len, ignore_eos=True):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
            tokens += chunk.token_ids
    return first, tokens


def prefix_cache_gauges(metrics_port: int) -> dict[str, float]:
    """The replicas' prefix-cache gauges from /metrics, summed over replicas."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("gemma_prefix_cache_queries_tokens", "gemma_prefix_cache_hits_tokens"):
            if line.startswith(name + "{"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_mode(work: list[list[int]], output_len: int, extra_args: tuple[str, ...], tag: str) -> dict:
    """TTFTs and tokens of `work` sent one after another to a fresh server started with `extra_args`."""
    metrics_port = free_port()
    proc, target, _ = start_server(1, metrics_port=metrics_port, extra_args=extra_args,
                                   log_name=f"bench_prefix_cache_{tag}.log")
    try:
        before = prefix_cache_gauges(metrics_port)
        results = [ttft_and_tokens(target, prompt, output_len) for prompt in work]
        time.sleep(2.5)  # the gateway refreshes replica gauges every second
        after = prefix_cache_gauges(metrics_port)
    finally:
        stop_server(proc)
    queries = after.get("gemma_prefix_cache_queries_tokens", 0) - before.get("gemma_prefix_cache_queries_tokens", 0)
    hits = after.get("gemma_prefix_cache_hits_tokens", 0) - before.get("gemma_prefix_cache_hits_tokens", 0)
    return {"ttft": [t for t, _ in results], "tokens": [toks for _, toks in results],
            "hit_rate": hits / queries if queries else 0.0, "hits": hits}


def replica_gauges(metrics_port: int) -> dict[str, dict[str, float]]:
    """Per replica: its prefix-cache queries and hits (tokens) from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for name in ("gemma_prefix_cache_queries_tokens", "gemma_prefix_cache_hits_tokens"):
            if line.startswith(name + "{"):
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                out.setdefault(replica, {})[name] = float(line.rsplit(" ", 1)[1])
    return out


def run_routing(policy: str, work: list[list[int]], wave: int, output_len: int) -> dict:
    """`work` in waves of `wave` concurrent requests against 2 replicas under `policy`; the
    replicas' hit rate and each one's share of the requests."""
    import concurrent.futures

    metrics_port = free_port()
    proc, target, _ = start_server(1, metrics_port=metrics_port, log_name=f"bench_prefix_routing_{policy}.log",
                                   extra_args=("--replicas", "2", "--routing", policy))
    try:
        before = replica_gauges(metrics_port)
        with concurrent.futures.ThreadPoolExecutor(wave) as pool:
            for start in range(0, len(work), wave):
                list(pool.map(lambda p: ttft_and_tokens(target, p, output_len), work[start:start + wave]))
        time.sleep(2.5)
        after = replica_gauges(metrics_port)
    finally:
        stop_server(proc)
    per_request = len(work[0]) - 1  # tokens each request looks up (all but its last)
    queries = {r: after[r].get("gemma_prefix_cache_queries_tokens", 0)
               - before.get(r, {}).get("gemma_prefix_cache_queries_tokens", 0) for r in after}
    hits = sum(after[r].get("gemma_prefix_cache_hits_tokens", 0)
               - before.get(r, {}).get("gemma_prefix_cache_hits_tokens", 0) for r in after)
    requests = {r: round(q / per_request) for r, q in queries.items()}
    return {"hit_rate": hits / max(1.0, sum(queries.values())), "requests": requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--routing-requests", type=int, default=32,
                        help="requests of the routing run (2 replicas, 4 system prompts, interleaved); 0 skips it")
    parser.add_argument("--routing-wave", type=int, default=4, help="routing run: requests in flight together")
    args = parser.parse_args()
    from gemma_dist.model.loading import open_checkpoint

    checkpoint = open_checkpoint("default")
    vocab = checkpoint.config.vocab_size
    checkpoint.source.close()
    prefix = prompts(1, args.prefix_len, vocab, seed=3)[0]
    suffixes = prompts(args.requests, args.suffix_len + 1, vocab, seed=4)
    work = [prefix + suffix[1:] for suffix in suffixes]  # suffixes without their BOS
    modes = {"prefix caching on": run_mode(work, args.output_len, (), "on"),
             "prefix caching off": run_mode(work, args.output_len, ("--no-prefix-caching",), "off")}
    print(f"\n{args.requests} requests one after another: {args.prefix_len}-token shared prefix + "
          f"{args.suffix_len}-token suffix, {args.output_len} output tokens, greedy; gemma-dist serve tp=1, "
          f"Gemma 3 270M fp32\n")
    print("| mode | TTFT request 1 (s) | TTFT requests 2.. p50 (s) | max (s) | prefix-cache hit rate |")
    print("|---|---|---|---|---|")
    for name, r in modes.items():
        rest = r["ttft"][1:]
        print(f"| {name} | {r['ttft'][0]:.3f} | {percentile(rest, 50):.3f} | {max(rest):.3f} | "
              f"{r['hit_rate']:.1%} ({r['hits']:.0f} tokens) |")
    on, off = modes["prefix caching on"], modes["prefix caching off"]
    speedup = percentile(off["ttft"][1:], 50) / percentile(on["ttft"][1:], 50)
    print(f"\nTTFT of requests 2..{args.requests}, p50: off / on = {speedup:.1f}x")
    same = on["tokens"] == off["tokens"]
    print(f"same greedy tokens with and without the cache: {same}")
    if args.routing_requests:
        systems = prompts(4, args.prefix_len, vocab, seed=10)
        tails = prompts(args.routing_requests, args.suffix_len + 1, vocab, seed=11)
        mixed = [systems[i % 4] + tails[i][1:] for i in range(args.routing_requests)]  # interleaved families
        print(f"\nRouting: 2 replicas (tp=1 each), 4 system prompts of {args.prefix_len} tokens, "
              f"{args.routing_requests} requests interleaved, {args.routing_wave} in flight at a time\n")
        print("| --routing | prefix-cache hit rate | requests per replica | largest share |")
        print("|---|---|---|---|")
        for policy in ("prefix", "least-loaded"):
            r = run_routing(policy, mixed, args.routing_wave, args.output_len)
            counts = sorted(r["requests"].items())
            share = max(r["requests"].values()) / max(1, sum(r["requests"].values()))
            print(f"| {policy} | {r['hit_rate']:.1%} | {', '.join(f'{k}: {v}' for k, v in counts)} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

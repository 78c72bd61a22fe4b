#!/usr/bin/env python
"""Prefix caching, served: time to first token of requests that share a long prefix, with the
cache on (the default) and off (`--no-prefix-caching`), in one run.

Starts `gemma-dist serve` (tp=1, default model, fp32) twice, as users do. Each time it sends N
requests one after another over gRPC: the same P-token prefix (random ordinary tokens, BOS first)
followed by a different S-token suffix each, O output tokens (greedy). Reports time to first token
of request 1 (nothing cached yet) and of requests 2..N (p50 and max), the ratio off/on, the
replica's prefix-cache hit rate from /metrics, and whether both servers returned the same tokens.

    .venv/bin/python bench/bench_prefix_cache.py [--requests 16] [--prefix-len 1024] [--suffix-len 32]
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
from bench.bench_serving import free_port, percentile, start_server, stop_server  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=4)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

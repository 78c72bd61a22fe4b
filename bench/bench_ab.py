#!/usr/bin/env python
"""Two served configurations compared on a noisy machine: bursts alternate between them, same run.

A shared 2-core host drifts by 10-20% within minutes, more than most changes to the serving
stack are worth, so two servers measured one after the other compare the machine's phases, not
the configurations. This starts both servers (`gemma-dist serve`, each with its own local Ray
cluster; the idle one costs little), then sends bursts of one shape (S concurrent gRPC streams
of P random prompt tokens + O output tokens, greedy) to A, then B, then A again, for R rounds, and
reports each configuration's output tok/s range and CPU-seconds per 1,000 tokens by process
role (gateway, coordinator, shard workers, Ray's own, this client; a steadier measure than tok/s
where the machine is saturated). Each burst has prompts of its own (no prefix-cache hits), and
both servers take --max-num-seqs S, so every stream runs at once.

A configuration is a quoted list of environment assignments (NAME=value, for the server and its
Ray workers) and `gemma-dist serve` flags, e.g.:

    .venv/bin/python bench/bench_ab.py --a "GOMP_SPINCOUNT=3000" --b "" [--tiny]
    .venv/bin/python bench/bench_ab.py --a "--step-dispatch compiled-graph" --b "" --streams 32

--tiny serves bench_overhead's tiny random Gemma 3 (its forward nearly free: the stack's own cost
shows), by default with 256 streams of 16 + 128 tokens; else the real Gemma 3 270M with 32 x
(128 + 128).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import prompts  # noqa: E402
from bench.bench_overhead import cpu_by_role, own_cpu, tiny_checkpoint  # noqa: E402
from bench.bench_serving import run_clients, start_server, stop_server  # noqa: E402


def split_config(spec: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """"NAME=value ... --flag value ..." → (environment, serve flags)."""
    env, flags = {}, []
    for word in shlex.split(spec):
        if not flags and "=" in word and not word.startswith("-"):
            name, value = word.split("=", 1)
            env[name] = value
        else:
            flags.append(word)
    return env, tuple(flags)


def start(model: str, tp: int, spec: str, tag: str, base_flags: tuple[str, ...]):
    """Launch one server with `base_flags`, then the configuration's environment and flags (a flag
    given twice: its later value wins); (process, target)."""
    env, flags = split_config(spec)
    flags = base_flags + flags
    saved = dict(os.environ)
    os.environ.update(env)  # inherited by the server and the Ray cluster it starts
    try:
        proc, target, _ = start_server(tp, model, "float32", "cpu", extra_args=flags, log_name=f"bench_ab_{tag}.log")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return proc, target


def burst(proc, target: str, work: list[list[int]], output_len: int) -> dict:
    """One burst against one server: tok/s and CPU-seconds per 1,000 output tokens by role."""
    cpu_before, client_before = cpu_by_role(proc.pid), own_cpu()
    result = run_clients(target, work, output_len)
    client = own_cpu() - client_before
    time.sleep(0.5)  # let the servers' last bookkeeping land in their CPU counters
    cpu_after = cpu_by_role(proc.pid)
    tokens = len(work) * output_len
    cpu = {role: (cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0)) * 1000 / tokens for role in cpu_after}
    cpu["client"] = client * 1000 / tokens
    return {"tok_s": result["tok_s"], "ttft50": result["ttft50"], "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="configuration A: NAME=value environment and serve flags")
    parser.add_argument("--b", required=True, help="configuration B (\"\": serve's defaults)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (the stack's own cost)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per configuration")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams (default 256 tiny, 32 real)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 16 tiny, 128 real")
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    from gemma_dist.model.loading import open_checkpoint
    from gemma_dist.model.loading.default_model import cache_root

    model = str(tiny_checkpoint(cache_root() / "bench-tiny-gemma3")) if args.tiny else "default"
    streams = args.streams or (256 if args.tiny else 32)
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    vocab = open_checkpoint(model).config.vocab_size
    specs = {"A": args.a, "B": args.b}
    # Every stream runs at once (as bench_overhead's served runs: its flags for the tiny model).
    base = ("--max-num-seqs", str(streams)) + (("--max-num-batched-tokens", "4096", "--kv-cache-memory",
                                                 str(1 << 30)) if args.tiny else ())
    servers = {}
    try:
        for tag, spec in specs.items():
            servers[tag] = start(model, args.tp, spec, tag, base)
            run_clients(servers[tag][1], prompts(2, prompt_len, vocab, seed=1), 4)  # warm-up
        runs: dict[str, list[dict]] = {tag: [] for tag in specs}
        for r in range(args.rounds):
            for i, tag in enumerate(specs):
                work = prompts(streams, prompt_len, vocab, seed=100 + 2 * r + i)  # its own: nothing cached
                out = burst(*servers[tag], work, args.output_len)
                runs[tag].append(out)
                print(f"  round {r + 1}, {tag}: {out['tok_s']:.1f} tok/s, TTFT p50 {out['ttft50']:.2f}s",
                      file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)

    name = "tiny random Gemma 3" if args.tiny else "Gemma 3 270M"
    print(f"\n{name}, fp32, {os.cpu_count()} CPUs, tp={args.tp}; {streams} gRPC streams x ({prompt_len} prompt + "
          f"{args.output_len} output), greedy; {args.rounds} alternating bursts per configuration\n")
    roles = sorted({role for rs in runs.values() for r in rs for role in r["cpu"]})
    print(f"| {'config':<6} | {'flags / environment':<40} | {'out tok/s (each burst)':<28} | "
          + " | ".join(f"{role[:11]:>11}" for role in roles) + " |")
    print("|" + "|".join("-" * w for w in [8, 42, 30] + [13] * len(roles)) + "|")
    for tag, spec in specs.items():
        rates = ", ".join(f"{r['tok_s']:.0f}" for r in runs[tag])
        means = [sum(r["cpu"].get(role, 0.0) for r in runs[tag]) / len(runs[tag]) for role in roles]
        print(f"| {tag:<6} | {spec or '(defaults)':<40} | {rates:<28} | " + " | ".join(f"{m:>11.3f}" for m in means)
              + " |")
    print("\nCPU columns: CPU-seconds per 1,000 output tokens (mean over the bursts), by process role.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

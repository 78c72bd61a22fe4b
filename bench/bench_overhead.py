#!/usr/bin/env python
"""The serving stack's own cost per token, with a model whose forward is nearly free.

A tiny random-weight Gemma 3 (7 layers, hidden 64, the real 262,144-token vocabulary and the
real tokenizer) makes the model's share of a step small, so what remains is host work an
accelerator would wait for: scheduling, building the step's inputs, sampling, detokenizing,
and moving plans and tokens between processes. One run measures, on the same greedy workload
(S concurrent streams of P prompt + O output tokens, ignore_eos):

  - the in-process engine (LLMEngine.step in a loop: the baseline), and again with greedy rows
    building whole (streams, 262,144) logits before their argmax (the LM head before its argmax path);
  - `gemma-dist serve` at tp=1 and tp=2 (Ray actors; steps by actor calls, and at tp=2 also by a Ray
    Compiled Graph; the shard workers' collectives through shared memory, and at tp=2 also through
    gloo alone: `--tp-collectives torch`), driven by S concurrent gRPC streams from this process over
    127.0.0.1;

and reports output tok/s, milliseconds per step split into phases (schedule, prepare, forward,
sample with the LM head, postprocess, transport; from the engine's counters, read over /metrics for the served
stack) and CPU-seconds per 1,000 output tokens of every process (gateway, coordinator, shard
workers, Ray's own, and this client).

    .venv/bin/python bench/bench_overhead.py [--streams 64,256] [--prompt-len 16] [--output-len 128]
                                             [--served 1,2,2:auto:torch,2:compiled-graph]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serving import free_port, start_server, stop_server  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "postprocess", "transport", "idle")
WORDS = ("river town market grain apple barrel morning signal engine harbor letter garden winter copper "
         "lantern orchard valley station bridge candle").split()


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny random Gemma 3 with the real tokenizer in HF layout (built once per directory)."""
    import torch
    import transformers

    from gemma_dist.model.loading.default_model import default_model_dir

    if (directory / "config.json").exists() and (directory / "tokenizer.model").exists():
        return directory
    config = transformers.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=512, query_pre_attn_scalar=16,
        max_position_embeddings=32_768, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(default_model_dir() / "tokenizer.model", directory / "tokenizer.model")
    return directory


def prompts(count: int, length: int, seed: int = 0) -> list[str]:
    """`count` text prompts of about `length` tokens each (real tokenization on every path)."""
    rng = random.Random(seed)
    return [f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, length - 4))) for i in range(count)]


# ------------------------------------------------------------------------------------ processes


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(root: int) -> dict[int, str]:
    """pid → role for `root` and every descendant: gateway, coordinator, worker, ray (its own)."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        names[int(entry.name)] = cmdline
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    roles = {}
    for pid in tree:
        name = names.get(pid, "")
        roles[pid] = ("gateway" if pid == root else "coordinator" if "Coordinator" in name
                      else "worker" if "ShardWorker" in name else "ray")
    return roles


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU-seconds so far per role in the server's process tree."""
    totals: dict[str, float] = {}
    for pid, role in _process_tree(root).items():
        totals[role] = totals.get(role, 0.0) + _cpu_seconds(pid)
    return totals


def own_cpu() -> float:
    """CPU-seconds of this process (the client, or the in-process engine)."""
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------ in-process engine


def run_engine(model_dir: Path, texts: list[str], output_len: int, max_num_seqs: int, max_batched: int,
               argmax_head: bool = True) -> dict:
    """The baseline: LLMEngine.step in a loop over the whole workload. argmax_head=False: greedy rows
    build their whole logits first, as before the greedy LM head (the before/after comparison)."""
    from gemma_dist import SamplingParams
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_model(str(model_dir), "float32", device="cpu", config=EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched, kv_cache_memory=1 << 30))
    engine.runner.argmax_head = argmax_head
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    def run(batch: list[str], tag: str) -> tuple[int, float]:
        for i, text in enumerate(batch):
            engine.add_request(f"{tag}{i}", text, params)
        tokens, start = 0, time.perf_counter()
        while engine.has_unfinished_requests:
            tokens += sum(len(d.token_ids) for d in engine.step())
        return tokens, time.perf_counter() - start

    run(texts[:4], "warm")  # allocations, first kernels
    before_times, before_steps, before_cpu = engine.times.as_dict(), engine.times.steps, own_cpu()
    tokens, wall = run(texts, "r")
    steps = engine.times.steps - before_steps
    after = engine.times.as_dict()
    phases = {k: (after[k] - before_times[k]) / steps for k in PHASES}
    return {"tok_s": tokens / wall, "tokens": tokens, "steps": steps, "ms_step": wall / steps * 1e3,
            "phases": phases, "cpu": {"engine": own_cpu() - before_cpu}}


# ------------------------------------------------------------------------------------ served stack


def scrape(metrics_port: int) -> dict[str, float]:
    """Engine step counters (summed over replicas) from the gateway's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gemma_engine_steps{"):
            out["steps"] = out.get("steps", 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("gemma_engine_step_seconds{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            out[phase] = out.get(phase, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Server:
    """`gemma-dist serve` in a subprocess, as users start it (bench_serving's launcher)."""

    def __init__(self, model_dir: Path, tp: int, dispatch: str, max_num_seqs: int, max_batched: int,
                 collectives: str = "auto"):
        self.metrics_port = free_port()
        self.proc, self.target, _ = start_server(
            tp, str(model_dir), "float32", "cpu", self.metrics_port,
            ("--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_batched),
             "--kv-cache-memory", str(1 << 30), "--step-dispatch", dispatch, "--tp-collectives", collectives),
            f"bench_overhead_serve_tp{tp}_{dispatch}_{collectives}.log")

    def stop(self) -> None:
        stop_server(self.proc)


async def _stream_all(target: str, texts: list[str], output_len: int) -> tuple[int, float, list[float]]:
    """Every prompt as its own GenerateStream call, all at once (`gemma-dist bench`'s load
    generator); (tokens, wall seconds, TTFTs)."""
    from gemma_dist.bench import Workload, run_grpc

    report = await run_grpc(target, Workload(list(texts), [output_len] * len(texts)), concurrency=len(texts))
    return report.output_tokens, report.wall, [r.first - r.start if r.first is not None else 0.0
                                               for r in report.results]


def run_served(server: Server, texts: list[str], output_len: int) -> dict:
    """One burst of len(texts) concurrent streams against a running server."""
    asyncio.run(_stream_all(server.target, texts[:4], 4))  # warm-up
    time.sleep(1.5)  # the gateway refreshes its gauges every second
    before, cpu_before, client_before = scrape(server.metrics_port), cpu_by_role(server.proc.pid), own_cpu()
    tokens, wall, ttfts = asyncio.run(_stream_all(server.target, texts, output_len))
    client = own_cpu() - client_before
    time.sleep(1.5)
    after, cpu_after = scrape(server.metrics_port), cpu_by_role(server.proc.pid)
    steps = max(1.0, after.get("steps", 0) - before.get("steps", 0))
    phases = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in PHASES}
    cpu = {role: cpu_after.get(role, 0) - cpu_before.get(role, 0) for role in cpu_after}
    cpu["client"] = client
    ttfts.sort()
    return {"tok_s": tokens / wall, "tokens": tokens, "steps": int(steps), "ms_step": wall / steps * 1e3,
            "phases": phases, "cpu": cpu, "ttft50": ttfts[len(ttfts) // 2]}


# ------------------------------------------------------------------------------------ report


def print_table(rows: list[tuple[str, int, dict]], engine: dict[int, dict]) -> None:
    head = (f"| {'path':<28} | {'streams':>7} | {'out tok/s':>9} | {'x engine':>8} | {'ms/step':>7} | "
            + " | ".join(f"{p[:9]:>9}" for p in PHASES) + f" | {'CPU-s/1k tok':>12} | "
            f"{'CPU split (s/1k tok)':<60} |")
    print(head)
    print("|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")[:-1]) + "|" + "-" * 62 + "|")
    for name, streams, r in rows:
        base = engine.get(streams)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else ""
        per_k = 1000 / r["tokens"]
        total = sum(r["cpu"].values()) * per_k
        split = ", ".join(f"{k} {v * per_k:.2f}" for k, v in sorted(r["cpu"].items()) if v * per_k >= 0.005)
        print(f"| {name:<28} | {streams:>7} | {r['tok_s']:>9.0f} | {ratio:>8} | {r['ms_step']:>7.1f} | "
              + " | ".join(f"{max(0.0, r['phases'][p]) * 1e3:>9.2f}" for p in PHASES)
              + f" | {total:>12.2f} | {split:<60} |")


def served_config(spec: str) -> tuple[int, str, str]:
    """"TP[:DISPATCH[:COLLECTIVES]]" → (tp, dispatch, collectives), "auto" where left out."""
    tp, dispatch, collectives = (spec.split(":") + ["auto", "auto"])[:3]
    return int(tp), dispatch, collectives


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="64,256", help="concurrent streams, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--served", default="1,2,2:auto:torch,2:compiled-graph",
                        help="served configurations TP[:DISPATCH[:COLLECTIVES]], comma-separated (dispatch: auto, "
                             "actor-calls, compiled-graph; collectives: serve's --tp-collectives, auto or torch; "
                             "default auto); 'none': the engine only")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--whole-logits", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the engine with greedy rows building whole logits (the LM head before "
                             "its argmax path), same run")
    parser.add_argument("--model-dir", default=None,
                        help="where the tiny checkpoint lives (built once; default under ~/.cache/gemma_dist)")
    args = parser.parse_args()
    from gemma_dist.model.loading.default_model import cache_root

    import torch

    model_dir = tiny_checkpoint(Path(args.model_dir) if args.model_dir else cache_root() / "bench-tiny-gemma3")
    streams = [int(s) for s in args.streams.split(",")]
    max_seqs = max(streams)
    batched = max(args.max_num_batched_tokens, max_seqs)
    served = [] if args.served == "none" else [served_config(c) for c in args.served.split(",")]
    rows, engine = [], {}
    for n in streams:
        engine[n] = run_engine(model_dir, prompts(n, args.prompt_len, seed=n), args.output_len, max_seqs, batched)
        rows.append(("in-process engine", n, engine[n]))
        print(f"  engine, {n} streams: {engine[n]['tok_s']:.0f} tok/s", file=sys.stderr)
        if args.whole_logits:
            whole = run_engine(model_dir, prompts(n, args.prompt_len, seed=n), args.output_len, max_seqs, batched,
                               argmax_head=False)
            rows.append(("engine, whole logits", n, whole))
            print(f"  engine with whole logits, {n} streams: {whole['tok_s']:.0f} tok/s", file=sys.stderr)
    for tp, dispatch, collectives in served:
        server = Server(model_dir, tp, dispatch, max_seqs, batched, collectives)
        name = (f"served tp={tp}" + ("" if dispatch == "auto" else f", {dispatch}")
                + ("" if collectives == "auto" else f", {collectives} collectives"))
        try:
            for n in streams:
                result = run_served(server, prompts(n, args.prompt_len, seed=n), args.output_len)
                rows.append((name, n, result))
                print(f"  {name}, {n} streams: {result['tok_s']:.0f} tok/s", file=sys.stderr)
        finally:
            server.stop()
    print(f"\ntiny random Gemma 3 (7 layers, hidden 64, vocab 262,144, real tokenizer), fp32, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; greedy, {args.prompt_len} prompt + {args.output_len} output tokens per stream; "
          f"max_num_seqs {max_seqs}, max_num_batched_tokens {batched}. Phases: ms per step.\n")
    print_table(rows, engine)
    print("\nserved = `gemma-dist serve` (gateway, coordinator and shard-worker processes) and S gRPC streams; "
          "dispatch auto = actor calls on CPU. Phases in ms per step: schedule and postprocess on the engine "
          "(coordinator), prepare / forward / sample on the runner (rank 0; sample includes the LM head); "
          "transport = the engine's wait beyond the runner's own time (0 when it postprocesses meanwhile); "
          "idle = the runner waiting between the end "
          "of a step and the start of the next (its own clock): what an accelerator would wait for each step.")
    for n in streams:
        one = next((r for name, s, r in rows if name == "served tp=1" and s == n), None)
        for name, s, r in rows:
            if s == n and one and name.startswith("served tp=") and name != "served tp=1":
                print(f"{name} / served tp=1 at {n} streams: {r['tok_s'] / one['tok_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Served throughput and latency over gRPC, against transformers and the in-process engine, same run.

Starts `gemma-dist serve` (Ray replicas) as users do, fires N concurrent streaming gRPC clients,
each with P random prompt tokens and O output tokens (greedy, ignore_eos), and reports output
tok/s, time to first token (TTFT) and time per output token (TPOT) p50/p99. Baselines on the
same prompts: transformers' batched generate and gemma_dist's in-process engine (LLM.generate),
the engine measured before and again after the served runs, so a machine whose speed drifts
between the phases shows as a range instead of a skewed ratio. Also: tp=2 against tp=1, and the
cold start from launching `gemma-dist serve` to the first token.

    .venv/bin/python bench/bench_serving.py [--clients 32] [--prompt-len 128] [--output-len 128] [--tp 1,2]
                                           [--quantize int8]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import engine_throughput, prompts, transformers_throughput  # noqa: E402
from gemma_dist import LLM, SamplingParams  # noqa: E402
from gemma_dist.bench import percentile  # noqa: E402
from gemma_dist.model.loading import open_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_gemma3_1b(directory: Path, tokenizer: Path | None = None, device: str = "cpu") -> Path:
    """A Gemma 3 1B-sized checkpoint with random weights (HF layout + a real tokenizer.model:
    `tokenizer`, default the default model's), for measuring speed where the real 1B weights
    cannot be downloaded. Built once per directory, in bf16 on `device`."""
    import shutil

    import transformers

    if (directory / "config.json").exists():
        return directory
    if tokenizer is None:
        from gemma_dist.model.loading.default_model import default_model_dir

        tokenizer = default_model_dir() / "tokenizer.model"
    if not Path(tokenizer).is_file():  # fail before spending a minute building weights
        raise FileNotFoundError(f"{tokenizer}: tokenizer.model not found (pass --tokenizer)")
    config = transformers.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        max_position_embeddings=32_768, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(tokenizer, directory / "tokenizer.model")
    return directory


def start_server(tp: int, model: str = "default", dtype: str = "float32", device: str = "auto",
                 metrics_port: int = 0, extra_args: tuple[str, ...] = (),
                 log_name: str | None = None) -> tuple[subprocess.Popen, str, float]:
    """Launch `gemma-dist serve` (with `extra_args`, logging to $OUT or /tmp); returns the process,
    its target, and seconds to the first token."""
    from gemma_dist.client import Client

    port = free_port()
    launched = time.perf_counter()
    log_path = Path(os.environ.get("OUT", "/tmp")) / (log_name or f"bench_serve_tp{tp}.log")
    proc = subprocess.Popen([sys.executable, "-m", "gemma_dist.cli", "serve", "--port", str(port), "--tp", str(tp),
                             "--model", model, "--dtype", dtype, "--device", device, "--placement-timeout", "60",
                             "--metrics-port", str(metrics_port), "--http-port", "0", *extra_args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    target = f"127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gemma-dist serve exited with {proc.returncode}; log: {log_path}")
        if time.perf_counter() - launched > 300:
            proc.kill()
            raise RuntimeError(f"gemma-dist serve did not answer within 300 s; log: {log_path}")
        try:
            with Client(target, timeout=5) as client:
                next(iter(client.generate_stream("Hello", temperature=0, max_tokens=1)))
            return proc, target, time.perf_counter() - launched
        except Exception:
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_clients(target: str, work: list[list[int]], output_len: int) -> dict[str, float]:
    """All prompts at once, one streaming call each (`gemma-dist bench`'s load generator);
    throughput and latency percentiles."""
    import asyncio

    from gemma_dist.bench import Workload, run_grpc

    report = asyncio.run(run_grpc(target, Workload(list(work), [output_len] * len(work)), concurrency=len(work)))
    assert len(report.ok) == len(work) and all(r.tokens == output_len for r in report.results), report.failures()
    ttft, tpot = report.ttfts(), report.tpots()
    return {"tok_s": report.tok_s, "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "tpot50": percentile(tpot, 50), "tpot99": percentile(tpot, 99)}


def fresh_engine_throughput(model: str, dtype: str, device: str, work: list[list[int]], output_len: int,
                            quantize: str | None = None) -> float:
    """bench_engine's engine_throughput on a fresh LLM that is freed afterwards (its memory goes
    back before the next system runs)."""
    llm = LLM(model=model, dtype=dtype, device=device, quantize=quantize)
    # Warm-up on other prompts: the measured ones must not find their prefixes cached.
    llm.generate(prompts(2, len(work[0]), llm.config.vocab_size, seed=1), SamplingParams(temperature=0, max_tokens=4))
    tok_s = engine_throughput(llm, work, output_len)
    del llm
    if device == "cuda":  # hand the GPU memory to the next systems
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return tok_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--tp", default="1,2", help="tensor-parallel sizes to serve ('none': in-process only)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model for --random-1b (default: the default "
                                                          "model's)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--model", default="default", help="checkpoint to serve (default: the real Gemma 3 270M)")
    parser.add_argument("--random-1b", metavar="DIR", default=None,
                        help="build (once) and use a Gemma 3 1B-sized random-weight checkpoint in DIR")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="the int8 mode in the in-process engine and the server alike (CPU)")
    args = parser.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if args.random_1b:
        args.model = str(random_gemma3_1b(Path(args.random_1b), Path(args.tokenizer) if args.tokenizer else None, device))
    import importlib.util

    serve_tps = [] if args.tp == "none" else [int(t) for t in args.tp.split(",")]
    if serve_tps and importlib.util.find_spec("ray") is None:
        print("  ray is not installed: measuring the in-process engine only", file=sys.stderr)
        serve_tps = []

    vocab = open_checkpoint(args.model).config.vocab_size
    work = prompts(args.clients, args.prompt_len, vocab)
    engine_runs = [fresh_engine_throughput(args.model, args.dtype, device, work, args.output_len, args.quantize)]
    print(f"  in-process engine: {engine_runs[0]:.1f} tok/s", file=sys.stderr)
    model_dir = None if args.model == "default" else args.model
    theirs = None if args.skip_transformers else transformers_throughput(
        work, args.output_len, model_dir, getattr(torch, args.dtype), device)
    if theirs:
        print(f"  transformers: {theirs:.1f} tok/s", file=sys.stderr)
    served = {}
    for tp in serve_tps:
        proc, target, cold = start_server(tp, args.model, args.dtype, device,
                                          extra_args=("--quantize", args.quantize) if args.quantize else ())
        try:
            # The same warm-up as the in-process engine's (other prompts, so nothing measured is cached):
            # first-time costs (each shape's first kernels, first touches of the KV cache) stay out of both.
            run_clients(target, prompts(2, args.prompt_len, vocab, seed=1), 4)
            served[tp] = {**run_clients(target, work, args.output_len), "cold": cold}
        finally:
            stop_server(proc)
        print(f"  served tp={tp}: {served[tp]}", file=sys.stderr)
    if served:  # again, after: the served figures are compared with both
        engine_runs.append(fresh_engine_throughput(args.model, args.dtype, device, work, args.output_len,
                                                   args.quantize))
        print(f"  in-process engine, again: {engine_runs[-1]:.1f} tok/s", file=sys.stderr)
    engine = sum(engine_runs) / len(engine_runs)

    label = f"{args.clients} concurrent x ({args.prompt_len} prompt + {args.output_len} output)"
    name = "Gemma 3 270M" if args.model == "default" else ("Gemma 3 1B-sized (random weights)"
                                                            if args.random_1b else args.model)
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
    mode = ", int8 mode" if args.quantize else ""
    print(f"\n{name}, {args.dtype}{mode}, {hardware}, torch {torch.__version__}; {label}, greedy\n")
    print(f"| {'system':<34} | {'out tok/s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'TPOT p50':>8} | "
          f"{'TPOT p99':>8} | {'cold start':>10} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for tp, r in served.items():
        print(f"| {'gemma_dist served, gRPC, tp=' + str(tp):<34} | {r['tok_s']:>9.1f} | {r['ttft50']:>7.2f}s | "
              f"{r['ttft99']:>7.2f}s | {r['tpot50'] * 1e3:>6.0f}ms | {r['tpot99'] * 1e3:>6.0f}ms | {r['cold']:>9.1f}s |")
    for when, tok_s in zip(("before", "after"), engine_runs):
        print(f"| {'in-process engine, ' + when:<34} | {tok_s:>9.1f} | {'':>8} | {'':>8} | {'':>8} | "
              f"{'':>8} | {'':>10} |")
    if theirs:
        print(f"| {'transformers batched generate':<34} | {theirs:>9.1f} | {'':>8} | {'':>8} | {'':>8} | {'':>8} | "
              f"{'':>10} |")
    if 1 in served:
        ratios = sorted(served[1]["tok_s"] / tok_s for tok_s in engine_runs)
        print(f"\nserved tp=1 / in-process engine (mean of the runs before and after): "
              f"{served[1]['tok_s'] / engine:.2f} (against each: {ratios[0]:.2f}-{ratios[-1]:.2f})"
              + (f"; served tp=1 / transformers: {served[1]['tok_s'] / theirs:.2f}x" if theirs else ""))
    if 1 in served and 2 in served:
        print(f"served tp=2 / tp=1: {served[2]['tok_s'] / served[1]['tok_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

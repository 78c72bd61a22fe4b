#!/usr/bin/env python
"""The XLA path on XLA's CPU backend: compile counts before/after warm-up and while serving, and
greedy throughput against the eager PyTorch engine in the same run.

Run in the XLA environment (`make install-xla`):

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 PYTHONPATH=. ~/.cache/gemma_dist/venv-xla-torch2.9.0/bin/python bench/bench_xla.py

XLA:CPU is a correctness target here, not a fast backend: the numbers say what compiles when,
and how far a CPU emulation of the TPU path is from eager CPU PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import prompts  # noqa: E402
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from gemma_dist.engine.xla_runner import compile_count, device_count  # noqa: E402
from gemma_dist.model.loading import load_model, open_checkpoint  # noqa: E402
from gemma_dist.sampling import SamplingParams  # noqa: E402


def serve(engine: LLMEngine, work: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    """Output tok/s of all requests submitted at once (greedy), and their tokens."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(work):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests:
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    elapsed = time.perf_counter() - start
    return len(work) * output_len / elapsed, [outputs[f"r{i}"] for i in range(len(work))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--tp", default="1,4", help="SPMD shard counts to run")
    args = parser.parse_args()
    config = EngineConfig(kv_cache_memory=64 << 20, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                          max_model_len=128)
    checkpoint = open_checkpoint("default")
    tokenizer = checkpoint.load_tokenizer()
    work = prompts(args.requests, args.prompt_len, checkpoint.config.vocab_size)
    eager = LLMEngine(load_model(checkpoint, "float32"), tokenizer, config)
    serve(eager, work[:1], 2)  # warm-up
    eager_tok_s, eager_tokens = serve(eager, work, args.output_len)
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        before = compile_count()
        start = time.perf_counter()
        engine = LLMEngine.on_xla(checkpoint, tokenizer, "float32", tp, config)
        ready = time.perf_counter() - start
        warmed = compile_count()
        tok_s, tokens = serve(engine, work, args.output_len)
        rows.append((tp, len(engine.runner.buckets.graph_shapes()), warmed - before, ready, compile_count() - warmed,
                     tok_s, tokens == eager_tokens))
    checkpoint.source.close()
    print(f"\nGemma 3 270M, fp32, XLA:CPU with {device_count()} virtual devices ({os.cpu_count()} cores), "
          f"torch {torch.__version__}; {args.requests} requests x ({args.prompt_len} prompt + "
          f"{args.output_len} output), greedy\n")
    print("| run | bucketed shapes | graphs compiled in warm-up | load + warm-up | compiles while serving "
          "| out tok/s | same tokens as eager |")
    print("|---|---|---|---|---|---|---|")
    for tp, shapes, compiled, ready, later, tok_s, same in rows:
        print(f"| XLA SPMD tp={tp} | {shapes} | {compiled} | {ready:.1f} s | {later} | {tok_s:.1f} | {same} |")
    print(f"| eager PyTorch (CPU) | - | - | - | - | {eager_tok_s:.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Offline engine throughput of gemma_dist against transformers' batched generate, same run.

Workload: N requests of P random prompt tokens + O generated tokens each (greedy, ignore_eos),
default model (Gemma 3 270M), fp32. Also: this machine's fp32 GEMM peak and the workload's
FLOPs (so the fp32 limit in tok/s and the share of it reached), the same workload with the
weights not prepacked for oneDNN (MKL's GEMMs: the previous path), time to first token for N
prompts arriving together against the ideal prefill time at peak, output tok/s at several
concurrency levels, time to first token of a request that arrives while 31 others are decoding,
and KV memory per token.

    .venv/bin/python bench/bench_engine.py [--requests 32] [--prompt-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_dist import LLM, SamplingParams  # noqa: E402
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from gemma_dist.engine.model_runner import kv_bytes_per_token  # noqa: E402
from gemma_dist.model.layers import set_cpu_kernels  # noqa: E402
from gemma_dist.model.loading.default_model import default_model_dir  # noqa: E402


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random ordinary token ids, BOS first."""
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(1000, vocab // 2, (length - 1,), generator=g).tolist() for _ in range(n)]


def engine_throughput(llm: LLM, work: list[list[int]], output_len: int) -> float:
    """Output tok/s of LLM.generate over the whole workload (prefill included)."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(work, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outs)
    return len(work) * output_len / elapsed


def transformers_throughput(work: list[list[int]], output_len: int, model_dir: str | Path | None = None,
                            dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Output tok/s of transformers' batched generate on the same weights and prompts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir or default_model_dir(), dtype=dtype).to(device).eval()
    ids = torch.tensor(work, device=device)
    generate = dict(input_ids=ids, attention_mask=torch.ones_like(ids), min_new_tokens=output_len, do_sample=False,
                    top_p=None, top_k=None, temperature=None, pad_token_id=0)
    if device != "cpu":  # warm-up (CUDA kernels, allocator)
        with torch.no_grad():
            model.generate(**{**generate, "min_new_tokens": 4}, max_new_tokens=4)
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**generate, max_new_tokens=output_len)
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + output_len
    return len(work) * output_len / elapsed


def gemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM rate in FLOP/s (best of `repeats` size^3 products, all threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workload_flops(config, requests: int, prompt_len: int, output_len: int) -> tuple[float, float]:
    """(whole workload, prefill alone) FLOPs: 2 per weight per token through the layers, the LM
    head once per output token (the first comes from the prefill), and attention's QK and PV."""
    h, layers = config.hidden_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer_weights = layers * (h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size)
    lm_head = 2 * config.vocab_size * h

    def attention(start: int, stop: int) -> float:  # positions start..stop-1, full context each
        return layers * 4 * q * (stop * (stop + 1) - start * (start + 1)) / 2

    prefill = requests * (prompt_len * 2 * layer_weights + lm_head + attention(0, prompt_len))
    decode = requests * ((output_len - 1) * (2 * layer_weights + lm_head)
                         + attention(prompt_len, prompt_len + output_len - 1))
    return prefill + decode, prefill


def time_to_first_token_together(llm: LLM, work: list[list[int]]) -> list[float]:
    """Seconds to each request's first token when all of `work` arrives at once."""
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=1 << 30, prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    start, first = time.perf_counter(), {}
    for i, prompt in enumerate(work):
        engine.add_request(f"r{i}", prompt, params)
    while len(first) < len(work):
        for delta in engine.step():
            if delta.token_ids and delta.request_id not in first:
                first[delta.request_id] = time.perf_counter() - start
    while engine.has_unfinished_requests:
        engine.step()
    return sorted(first.values())


def time_to_first_token_under_load(llm: LLM, work: list[list[int]], output_len: int) -> float:
    """Seconds from adding a request to its first token while len(work) others are decoding."""
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=1 << 30, prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(work):
        engine.add_request(f"bg{i}", prompt, params)
    while engine.stats().waiting or any(s.num_cached < len(s.prompt_token_ids)
                                        for s in engine.scheduler.running):
        engine.step()  # until every background request is decoding
    engine.add_request("probe", work[0], params)
    start = time.perf_counter()
    while True:
        if any(d.request_id == "probe" and d.token_ids for d in engine.step()):
            return time.perf_counter() - start


# Op classes of the profile table, by the first pattern an op's name contains (else "other ops").
OP_CLASSES = (
    ("GEMM (layers, LM head)", ("linear", "aten::mm", "aten::addmm", "aten::matmul", "quantized::")),
    ("attention (QK/PV products, softmax, masks)", ("aten::bmm", "softmax", "masked_fill", "aten::baddbmm")),
    ("K/V gathers and cache writes", ("index_select", "index_copy", "aten::index", "aten::gather", "index_put")),
    ("sampling (argmax, top-k/p, log-softmax)", ("argmax", "amax", "topk", "sort", "multinomial", "log_softmax",
                                                 "aten::max")),
    ("norms, RoPE, activations, residuals", ("aten::mul", "aten::add", "aten::pow", "aten::mean", "rsqrt", "gelu",
                                            "tanh", "aten::cos", "aten::sin", "aten::neg", "aten::div", "aten::sum")),
    ("copies, casts, views, allocation", ("copy_", "_to_copy", "aten::to", "aten::cat", "empty", "fill_", "zero_",
                                         "as_strided", "aten::view", "aten::slice", "aten::select", "reshape",
                                         "contiguous", "aten::pad", "transpose", "aten::t", "aten::narrow",
                                         "aten::split", "expand", "unsqueeze", "aten::clone", "aten::stack")),
)


def profile_by_op_class(llm: LLM, work: list[list[int]], output_len: int) -> tuple[float, list[tuple[str, float]]]:
    """(wall seconds, [(op class, self CPU seconds)]) of LLM.generate over `work` under torch.profiler.
    The remainder of the wall time, outside every torch op, is host Python (engine, runner)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(work, params)
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        kind = next((label for label, patterns in OP_CLASSES if any(p in name for p in patterns)), "other ops")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    rows.append(("outside torch ops (host Python)", max(0.0, wall - sum(totals.values()))))
    return wall, rows


def print_profile(title: str, wall: float, rows: list[tuple[str, float]], tokens: int) -> None:
    print(f"\n{title}: {wall:.2f} s under the profiler, {tokens / wall:.1f} output tok/s\n")
    print("| op class | seconds | share of wall | ms per output token |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / wall:.1%} | {seconds / tokens * 1e3:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--sweep", default="1,8,32,64", help="concurrency levels for the tok/s sweep")
    parser.add_argument("--sweep-output-len", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="only profile (torch.profiler, per op class) the workload and a single stream")
    args = parser.parse_args()

    # The same prompts run several times (packed, unpacked, ...): no run may find them cached.
    llm = LLM(model="default", dtype="float32", prefix_caching=False)
    vocab = llm.config.vocab_size
    work = prompts(args.requests, args.prompt_len, vocab)
    engine_warm = engine_throughput(llm, work[:2], 4)  # warm-up (allocations, kernels)
    del engine_warm
    if args.profile:
        for title, batch in ((f"{args.requests} x ({args.prompt_len} + {args.output_len})", work),
                             (f"1 x ({args.prompt_len} + {args.output_len}), single stream", work[:1])):
            wall, rows = profile_by_op_class(llm, batch, args.output_len)
            print_profile(title, wall, rows, len(batch) * args.output_len)
        return 0
    peak = gemm_peak()
    total_flops, prefill_flops = workload_flops(llm.config, args.requests, args.prompt_len, args.output_len)
    limit = args.requests * args.output_len / (total_flops / peak)
    print(f"  fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s; workload {total_flops / 1e9:.0f} GFLOP", file=sys.stderr)
    ours = engine_throughput(llm, work, args.output_len)
    print(f"  gemma_dist engine: {ours:.1f} tok/s", file=sys.stderr)
    unpacked = None
    if llm.engine.runner.kernel_layers:  # the same workload on MKL's GEMMs (weights not prepacked), then packed again
        set_cpu_kernels(llm.model, prepack=False)
        unpacked = engine_throughput(llm, work, args.output_len)
        set_cpu_kernels(llm.model)
        print(f"  gemma_dist engine, weights not prepacked: {unpacked:.1f} tok/s", file=sys.stderr)
    ttfts = time_to_first_token_together(llm, prompts(args.requests, args.prompt_len, vocab, seed=7))
    ideal_prefill = prefill_flops / peak
    theirs = None if args.skip_transformers else transformers_throughput(work, args.output_len)
    if theirs:
        print(f"  transformers: {theirs:.1f} tok/s", file=sys.stderr)
    sweep = []
    for n in (int(x) for x in args.sweep.split(",")):
        rate = engine_throughput(llm, prompts(n, args.prompt_len, vocab, seed=n), args.sweep_output_len)
        sweep.append((n, rate))
        print(f"  {n} concurrent: {rate:.1f} tok/s", file=sys.stderr)
    ttft = time_to_first_token_under_load(llm, prompts(31, args.prompt_len, vocab, seed=99), args.output_len)
    per_token = kv_bytes_per_token(llm.model, torch.float32)

    print(f"\nGemma 3 270M, fp32, {torch.get_num_threads()} CPU threads, torch {torch.__version__}\n")
    print(f"| {'measure':<62} | {'value':>12} |")
    print(f"|{'-' * 64}|{'-' * 14}|")
    label = f"{args.requests} x ({args.prompt_len} prompt + {args.output_len} output)"
    print(f"| {'fp32 GEMM peak, 2048^3, GFLOP/s':<62} | {peak / 1e9:>12.1f} |")
    print(f"| {'workload FLOPs (' + label + '), GFLOP':<62} | {total_flops / 1e9:>12.0f} |")
    print(f"| {'fp32 limit at that peak, output tok/s':<62} | {limit:>12.1f} |")
    print(f"| {'gemma_dist engine, ' + label + ', output tok/s':<62} | {ours:>12.1f} |")
    print(f"| {'share of the fp32 limit':<62} | {ours / limit:>11.0%} |")
    if unpacked:
        print(f"| {'same, weights not prepacked (MKL GEMMs), output tok/s':<62} | {unpacked:>12.1f} |")
    if theirs:
        print(f"| {'transformers batched generate, same workload, output tok/s':<62} | {theirs:>12.1f} |")
        print(f"| {'speed-up over transformers':<62} | {ours / theirs:>11.2f}x |")
    for n, rate in sweep:
        name = f"{n} concurrent ({args.prompt_len} + {args.sweep_output_len}), output tok/s"
        print(f"| {name:<62} | {rate:>12.1f} |")
    together = f"{args.requests} x {args.prompt_len}-token prompts arriving together"
    print(f"| {'time to first token p50, ' + together + ' (s)':<62} | {ttfts[len(ttfts) // 2]:>12.2f} |")
    print(f"| {'time to first token max, same (s)':<62} | {ttfts[-1]:>12.2f} |")
    print(f"| {'ideal prefill time at the GEMM peak (s)':<62} | {ideal_prefill:>12.2f} |")
    print(f"| {'time to first token max / ideal':<62} | {ttfts[-1] / ideal_prefill:>11.2f}x |")
    print(f"| {'time to first token, arriving while 31 decode (s)':<62} | {ttft:>12.3f} |")
    print(f"| {'KV cache per token (bytes, all 18 layers, K+V, fp32)':<62} | {per_token:>12,} |")
    print(f"| {'KV cache tokens held by the default 2 GiB budget':<62} | {llm.max_cached_tokens:>12,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

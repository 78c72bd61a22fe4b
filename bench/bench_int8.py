#!/usr/bin/env python
"""The int8 mode against the exact fp32 mode and llama.cpp, same run, on Gemma 3 270M.

Workloads (greedy, ignore_eos, output tokens over wall time including prefill, as llama.cpp's
batched bench counts them when divided by its total time): N requests of P random prompt tokens
+ O output tokens, and one stream of P + O; and that stream's decode phase alone (llama-bench's tg
counts that). gemma_dist runs in this process (LLM.generate), with
every linear layer and the LM head exact (fp32, prepacked oneDNN) or int8 (`quantize="int8"`:
layers.Int8Blocks, int8 weights and activations in blocks of 16 values, the LM head's weights in
blocks of 32, fp16 weight scales).

With --llama-cpp DIR (a llama.cpp build's bin directory; a measuring stick only, never a
dependency) the same run also runs, on the GGUF the default model comes from (Q4_K_M):
`llama-batched-bench -npp P -ntg O -npl 1,N` and `llama-bench -p P -n O`, with this process's
thread count. Build it from the sdist that PyPI's llama-cpp-python vendors (about 10 minutes here):

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF \\
        && cmake --build build --target llama-batched-bench llama-bench

    .venv/bin/python bench/bench_int8.py [--requests 32] [--prompt-len 128] [--output-len 128] [--llama-cpp DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import engine_throughput, prompts  # noqa: E402
from gemma_dist import LLM  # noqa: E402
from gemma_dist.model.layers import set_cpu_kernels  # noqa: E402


def llama_cpp(bin_dir: Path, gguf: str, requests: int, prompt_len: int, output_len: int,
              threads: int) -> dict[str, float]:
    """llama.cpp's output tok/s (prefill included) at 1 and `requests` parallel sequences, and
    llama-bench's decode-only tg figure."""
    env = dict(os.environ, LD_LIBRARY_PATH=f"{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    batched = subprocess.run(
        [str(bin_dir / "llama-batched-bench"), "-m", gguf, "-c", str(requests * (prompt_len + output_len) + 256),
         "-b", "2048", "-ub", "512", "-npp", str(prompt_len), "-ntg", str(output_len), "-npl", f"1,{requests}",
         "-t", str(threads)], capture_output=True, text=True, env=env, check=True).stdout
    out = {}
    for line in batched.splitlines():  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            parallel, total_s = int(cells[2]), float(cells[8])
            out[f"batched_{parallel}"] = parallel * output_len / total_s
            out[f"decode_{parallel}"] = float(cells[7])
    bench = subprocess.run([str(bin_dir / "llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(prompt_len),
                            "-n", str(output_len)], capture_output=True, text=True, env=env, check=True).stdout
    match = re.search(rf"\|\s*tg{output_len}\s*\|\s*([\d.]+)", bench)
    if match:
        out["tg"] = float(match.group(1))
    return out


def decode_throughput(llm: LLM, work: list[list[int]], output_len: int, reps: int = 2) -> float:
    """Output tok/s of the decode phase alone (what llama-bench's tg figure counts): the time of
    `output_len` tokens less the time of the first (prefill and first token), best of `reps`."""
    def best_time(tokens: int) -> float:
        return min(len(work) * tokens / engine_throughput(llm, work, tokens) for _ in range(reps))

    return len(work) * (output_len - 1) / (best_time(output_len) - best_time(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp build's bin directory")
    args = parser.parse_args()

    llm = LLM(model="default", dtype="float32", prefix_caching=False)
    work = prompts(args.requests, args.prompt_len, llm.config.vocab_size)
    single = prompts(1, args.prompt_len, llm.config.vocab_size, seed=1)
    rows: list[tuple[str, float]] = []
    for mode in (None, "int8", None):  # exact, int8, exact again: the machine's drift shows in the two exact runs
        set_cpu_kernels(llm.model, quantize=mode)
        engine_throughput(llm, work[:2], 4)  # warm-up
        name = mode or "fp32"
        for label, batch in ((f"{args.requests} x ({args.prompt_len} + {args.output_len})", work),
                             (f"1 x ({args.prompt_len} + {args.output_len})", single)):
            rate = engine_throughput(llm, batch, args.output_len)
            rows.append((f"gemma_dist {name}, {label}", rate))
            print(f"  {rows[-1][0]}: {rate:.1f} tok/s", file=sys.stderr)
        decode = decode_throughput(llm, single, args.output_len)
        rows.append((f"gemma_dist {name}, 1 stream, decode phase alone", decode))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.1f} tok/s", file=sys.stderr)
    set_cpu_kernels(llm.model)
    theirs = {}
    if args.llama_cpp is not None:
        from gemma_dist.model.loading.default_model import default_gguf_path

        theirs = llama_cpp(args.llama_cpp, str(default_gguf_path()), args.requests, args.prompt_len,
                           args.output_len, torch.get_num_threads())
        print(f"  llama.cpp: {theirs}", file=sys.stderr)

    print(f"\nGemma 3 270M, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; output tok/s "
          f"over wall time including prefill\n")
    print(f"| {'system':<58} | {'tok/s':>8} |")
    print(f"|{'-' * 60}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<58} | {rate:>8.1f} |")
    labels = {f"batched_{args.requests}": f"llama.cpp Q4_K_M, {args.requests} parallel ({args.prompt_len} + "
                                          f"{args.output_len})",
              "batched_1": f"llama.cpp Q4_K_M, 1 x ({args.prompt_len} + {args.output_len})",
              f"decode_{args.requests}": f"llama.cpp, {args.requests} parallel, decode phase alone",
              "decode_1": "llama.cpp, 1 stream, decode phase alone",
              "tg": f"llama-bench tg{args.output_len} (decode alone)"}
    for key, label in labels.items():
        if key in theirs:
            print(f"| {label:<58} | {theirs[key]:>8.1f} |")
    int8_batch, int8_single, int8_decode = rows[3][1], rows[4][1], rows[5][1]  # rows: 3 per mode
    if f"batched_{args.requests}" in theirs:
        print(f"\nint8 {args.requests}-stream / llama.cpp {args.requests} parallel: "
              f"{int8_batch / theirs[f'batched_{args.requests}']:.2f}x")
    if "batched_1" in theirs:
        print(f"int8 1 x ({args.prompt_len} + {args.output_len}) / llama.cpp's: "
              f"{int8_single / theirs['batched_1']:.2f}x")
    if "tg" in theirs:
        print(f"int8 single-stream decode / llama-bench tg{args.output_len}: {int8_decode / theirs['tg']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Model-level speed of gemma_dist against Hugging Face transformers, in the same run.

Rows: single-stream decode tok/s (fp32 and bf16), batch-32 decode tok/s (fp32), and the
time to load the default model cold (GGUF → safetensors conversion + load) and warm
(cached). Decode rate = (N - 1) extra tokens / (time for N tokens - time for 1 token), so
prefill is excluded for both engines. Greedy, ignore_eos, the same token ids for both.

    .venv/bin/python bench/bench_model.py [--tokens 64] [--batch 32] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_dist import LLM, SamplingParams  # noqa: E402
from gemma_dist.model.loading.default_model import default_model_dir  # noqa: E402


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` random ordinary token ids (BOS first)."""
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(1000, vocab // 2, (length - 1,), generator=g).tolist() for _ in range(batch)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_decode_rate(llm: LLM, batch: list[list[int]], tokens: int) -> float:
    """Output tok/s of gemma_dist's decode phase for this batch."""
    def run(n):
        return llm.generate(batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    run(2)  # warm-up
    t_one, t_all = timed(lambda: run(1)), timed(lambda: run(tokens))
    return len(batch) * (tokens - 1) / (t_all - t_one)


def hf_decode_rate(model, batch: list[list[int]], tokens: int) -> float:
    """Output tok/s of transformers' generate (batched, KV cache) decode phase."""
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=0)
    run(2)
    t_one, t_all = timed(lambda: run(1)), timed(lambda: run(tokens))
    return len(batch) * (tokens - 1) / (t_all - t_one)


def load_times() -> tuple[float, float]:
    """(cold, warm) seconds to construct LLM('default'): cold converts into an empty cache."""
    saved = os.environ.get("GEMMA_DIST_CACHE")
    tmp = tempfile.mkdtemp(prefix="gemma_dist_bench_cache.")
    os.environ["GEMMA_DIST_CACHE"] = tmp
    try:
        cold = timed(lambda: LLM(model="default"))
        warm = timed(lambda: LLM(model="default"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("GEMMA_DIST_CACHE", None)
        else:
            os.environ["GEMMA_DIST_CACHE"] = saved
    return cold, warm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    hf_dir = default_model_dir()  # the converted default model, in HF layout: same weights for both
    rows = []
    for dtype, batch in [("float32", 1), ("bfloat16", 1), ("float32", args.batch)]:
        if dtype == "bfloat16" and args.skip_bf16:
            continue
        torch_dtype = getattr(torch, dtype)
        llm = LLM(model="default", dtype=dtype)
        work = prompts(batch, args.prompt_len, llm.config.vocab_size)
        ours = ours_decode_rate(llm, work, args.tokens)
        del llm
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).eval()
        theirs = hf_decode_rate(hf, work, args.tokens)
        del hf
        rows.append((f"decode tok/s, batch {batch}, {dtype}", ours, theirs))
        print(f"  {rows[-1][0]}: gemma_dist {ours:.1f}, transformers {theirs:.1f}", file=sys.stderr)
    if not args.skip_load:
        cold, warm = load_times()
        rows.append(("load default model cold (convert + load), s", cold, None))
        rows.append(("load default model warm (cached), s", warm, None))

    print(f"\nGemma 3 270M on {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
          f"{args.tokens} tokens after a {args.prompt_len}-token prompt, greedy\n")
    print(f"| {'measure':<46} | {'gemma_dist':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:.2f}x" if theirs else ""
        theirs_s = f"{theirs:.1f}" if theirs else "-"
        print(f"| {name:<46} | {ours:>10.1f} | {theirs_s:>12} | {ratio:>6} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

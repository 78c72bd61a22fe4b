#!/usr/bin/env python
"""Beam search cost against greedy decoding, in one process on the same weights (LLM offline).

Beam search runs each live beam as a one-token request per step (gemma_dist.beam_search), so a
step of a width-k search computes k rows, each over the beam's last partial block (prefix caching
serves its full blocks). This prints, for P prompts of O output tokens: greedy (the baseline, the
same prompts batched), and beam search at each width: wall time, output tokens per second of the
best beam, and the model's mean log-probability per token of the best beam vs greedy's.

    .venv/bin/python bench/bench_beam.py [--prompts 8] [--output-len 32] [--widths 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn a language is",
           "In 1969, the first", "A recipe for bread:", "The theory of relativity says",
           "def fibonacci(n):", "The three primary colors are"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--widths", default="1,2,4")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    from gemma_dist import LLM, SamplingParams

    llm = LLM(args.model)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rows = []
    start = time.perf_counter()
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                                                  logprobs=1))
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in greedy)
    mean_lp = sum(lp.logprob for o in greedy for lp in o.logprobs) / tokens
    rows.append(("greedy (baseline)", wall, tokens / wall, mean_lp))
    for width in (int(w) for w in args.widths.split(",")):
        params = SamplingParams(beam_width=width, max_tokens=args.output_len, ignore_eos=True)
        start = time.perf_counter()
        out = llm.beam_search(prompts, params)
        wall = time.perf_counter() - start
        best = [o.sequences[0] for o in out]
        tokens = sum(len(s.token_ids) for s in best)
        rows.append((f"beam search, width {width}", wall, tokens / wall,
                     sum(s.cumulative_logprob for s in best) / tokens))
    print(f"\n{args.prompts} prompts x {args.output_len} tokens, {args.model}\n")
    print("| run | wall (s) | best-beam tok/s | mean logprob / token |\n|---|---|---|---|")
    for name, wall, rate, lp in rows:
        print(f"| {name} | {wall:.1f} | {rate:.1f} | {lp:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

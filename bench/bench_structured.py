#!/usr/bin/env python
"""What structured output costs: the same workload with and without a JSON-schema constraint, in one run.

The in-process engine on the real Gemma 3 270M (fp32, CPU) runs N concurrent requests of O output
tokens (ignore_eos, so every request generates exactly O tokens) three ways, alternating so drift
hits all alike: free, and every request under a JSON schema whose one string field never has to
end (the mask is computed every step; the grammar never completes), and half constrained. Reports
output tok/s per mode, the constrained modes' slowdown, and the time per step spent computing and
applying masks (grammar masks, candidate checks, and masking the rows whose best candidates include
a disallowed token).

    .venv/bin/python bench/bench_structured.py [--requests 32] [--output-len 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import prompts  # noqa: E402

SCHEMA = json.dumps({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]})


def run(engine, texts, output_len: int, constrained_every: int | None) -> tuple[float, int]:
    """(seconds, output tokens) of one batch; every `constrained_every`-th request constrained."""
    from gemma_dist import SamplingParams

    for i, text in enumerate(texts):
        schema = SCHEMA if constrained_every and i % constrained_every == 0 else None
        engine.add_request(f"{time.monotonic_ns()}-{i}", text,
                           SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, json_schema=schema))
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished_requests:
        tokens += sum(len(d.token_ids) for d in engine.step())
    return time.perf_counter() - start, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import gemma_dist.structured as structured
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_model("default", "float32", config=EngineConfig(
        kv_cache_memory=1 << 30, max_num_seqs=args.requests, max_num_batched_tokens=4096))
    texts = prompts(args.requests, args.prompt_len, engine.model_config.vocab_size)  # random ordinary token ids
    mask_seconds = [0.0]
    plain_masked_rows = structured.masked_rows

    def timed_masked_rows(logits, rows):
        start = time.perf_counter()
        try:
            return plain_masked_rows(logits, rows)
        finally:
            mask_seconds[0] += time.perf_counter() - start

    structured.masked_rows = timed_masked_rows  # the sampler looks it up at each call
    run(engine, texts[:4], 4, 1)  # warm-up: kernels, the grammar tokenizer
    modes = {"free": None, "all constrained": 1, "half constrained": 2}
    totals = {name: [0.0, 0, 0.0, 0] for name in modes}  # seconds, tokens, mask seconds, steps
    for _ in range(args.rounds):
        for name, every in modes.items():
            mask_seconds[0], steps = 0.0, engine.times.steps
            seconds, tokens = run(engine, texts, args.output_len, every)
            totals[name][0] += seconds
            totals[name][1] += tokens
            totals[name][2] += mask_seconds[0]
            totals[name][3] += engine.times.steps - steps
    free_rate = totals["free"][1] / totals["free"][0]
    print(f"\nStructured output, Gemma 3 270M fp32 CPU, {args.requests} concurrent requests x {args.output_len} tokens "
          f"(prompt ~{args.prompt_len}), {args.rounds} rounds alternating\n")
    print("| mode | output tok/s | vs free | mask ms per step |")
    print("|---|---|---|---|")
    for name, (seconds, tokens, masking, steps) in totals.items():
        rate = tokens / seconds
        print(f"| {name} | {rate:.1f} | {rate / free_rate:.3f}x | {masking / max(1, steps) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

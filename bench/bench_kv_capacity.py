#!/usr/bin/env python
"""KV capacity at long contexts: the sliding-window pool against one table for every layer, in one run.

Gemma 3 270M has 15 sliding-window layers (window 512) and 3 global ones. With the pool (the
default), a sliding-window layer keeps only the blocks its window still reads; with
`--no-window-pool` every layer keeps the whole context. Both engines get the same
--kv-cache-memory and the same N requests of C-token contexts (prompt C - O, O output tokens,
greedy), more than fit, arriving together; each engine runs until its first request finishes.
The report is the most sequences it held at once with their whole prompt cached (decoding, at
7,936-8,192 tokens with the defaults) while others waited, its `stats()` page figures then, and
the formula.

The model is a random Gemma 3 with 270M's KV geometry (18 layers 5:1, window 512, one KV head
of 256, block 16, fp32: 36,864 bytes per token), a small residual stream (hidden 64) and one query
head, so 8,192-token prefills take seconds instead of minutes on a CPU; the KV bytes, the layout and the
scheduler are those of the real model (and its tokenizer).

    .venv/bin/python bench/bench_kv_capacity.py [--context 8192] [--output-len 256] [--requests 40]
                                                [--kv-cache-memory BYTES]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = 16


def tiny_270m_geometry():
    """A random Gemma 3 with Gemma 3 270M's KV layout and bytes per token, hidden 64."""
    import torch

    from gemma_dist.config import VARIANTS
    from gemma_dist.model.gemma import GemmaForCausalLM

    real = VARIANTS["gemma-3-270m"]
    # One query head (the real model has 4) keeps 8k-token attention affordable; KV heads and
    # head_dim, which size the cache, are the real ones.
    config = real.replace(name="bench-270m-kv-geometry", vocab_size=1024, hidden_size=64, intermediate_size=128,
                          num_heads=1)
    torch.manual_seed(0)
    model = GemmaForCausalLM(config).float()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.05)
    return model.eval()


def run(model, tokenizer, window_pool: bool, args) -> dict:
    """Offer the engine more long requests than fit, and step until the first one finishes (or
    all are admitted and decode). Returns the most sequences it held at once with their whole
    prompt cached (decoding), and its stats() at that step."""
    import torch

    from gemma_dist import SamplingParams
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(model, tokenizer, EngineConfig(
        kv_cache_memory=args.kv_cache_memory, block_size=BLOCK, max_num_seqs=args.requests,
        max_num_batched_tokens=args.chunk, prefix_caching=False, kv_window_pool=window_pool))
    g = torch.Generator().manual_seed(1)
    prompt_len = args.context - args.output_len
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.requests):
        engine.add_request(f"r{i}", [2] + torch.randint(10, 1000, (prompt_len - 1,), generator=g).tolist(), params)
    held, at_peak, steps, start = 0, None, 0, time.perf_counter()
    while steps < args.max_steps:
        finished = any(delta.finish_reason is not None for delta in engine.step())
        steps += 1
        scheduler = engine.scheduler
        decoding = sum(1 for seq in scheduler.running if seq.num_cached >= prompt_len)
        if decoding > held:
            held, at_peak = decoding, engine.stats()
        if finished or not scheduler.waiting and decoding == len(scheduler.running):
            break
    return {"held": held, "stats": at_peak, "steps": steps, "seconds": time.perf_counter() - start,
            "waiting": len(engine.scheduler.waiting)}


def formula(args, groups_local: int, groups_global: int, group_size: int, layers: int) -> tuple[float, float]:
    """Sequences of `context` positions that fit, one table for all layers vs the pool (steady state:
    each LOCAL group holds its window, window / block + 1 blocks)."""
    per_token_layer = 2 * 1 * 256 * 4  # K and V, one KV head of 256, fp32
    blocks = math.ceil(args.context / BLOCK)
    single = args.kv_cache_memory / (blocks * BLOCK * layers * per_token_layer)
    window_blocks = min(blocks, math.ceil(512 / BLOCK) + 1)
    pages = blocks * groups_global + window_blocks * groups_local
    pooled = args.kv_cache_memory / (pages * BLOCK * group_size * per_token_layer)
    return single, pooled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192, help="positions per sequence (prompt + output)")
    parser.add_argument("--output-len", type=int, default=256,
                        help="long enough that none finishes while the cache fills")
    parser.add_argument("--requests", type=int, default=40, help="more than the pool holds")
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk)")
    parser.add_argument("--kv-cache-memory", type=float, default=2 << 30, help="bytes")
    parser.add_argument("--max-steps", type=int, default=100_000)
    args = parser.parse_args()

    from gemma_dist.config import KVLayout

    from gemma_dist.model.loading import open_checkpoint

    checkpoint = open_checkpoint("default")  # the real tokenizer (ids past the model's 1,024 are never sampled)
    tokenizer = checkpoint.load_tokenizer()
    checkpoint.source.close()
    model = tiny_270m_geometry()
    layout = KVLayout.of(model.config)
    results = {pool: run(model, tokenizer, pool, args) for pool in (False, True)}
    single, pooled = formula(args, sum(layout.group_local), layout.num_groups - sum(layout.group_local),
                             layout.group_size, model.config.num_layers)
    print(f"\nKV capacity at {args.context}-token contexts, Gemma 3 270M KV geometry (36,864 B/token fp32), "
          f"--kv-cache-memory {args.kv_cache_memory / (1 << 30):.2f} GiB, {args.requests} requests arriving together\n")
    print("| mode | pages in the cache (layers per page) | formula: sequences | measured: sequences held "
          "at once (whole prompt cached) | stats() then: global / local / free pages | preemptions | steps | s |")
    print("|---|---|---|---|---|---|---|---|")
    for pool in (False, True):
        r, per_page = results[pool], layout.group_size if pool else model.config.num_layers
        s = r["stats"]
        print(f"| {'window pool' if pool else 'one table (--no-window-pool)'} | {s.total_blocks} ({per_page}) | "
              f"{pooled if pool else single:.1f} | {r['held']} ({r['waiting']} still waiting at the end) | "
              f"{s.global_pages_used} / {s.local_pages_used} / {s.free_blocks} | {s.preemptions} | "
              f"{r['steps']} | {r['seconds']:.0f} |")
    ratio = results[True]["held"] / max(1, results[False]["held"])
    print(f"\nmeasured ratio pool / one table: {ratio:.2f}x (formula {pooled / single:.2f}x)")
    print(f"formula: one table holds M / (ceil(C/16) x 16 x 18 x 2 KiB) sequences; the pool M / ((ceil(C/16) x "
          f"{layout.num_groups - sum(layout.group_local)} + (512/16 + 1) x {sum(layout.group_local)}) x 16 x "
          f"{layout.group_size} x 2 KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

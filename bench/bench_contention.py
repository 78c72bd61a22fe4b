#!/usr/bin/env python
"""What other processes on the same cores cost the engine: the in-process engine on the overhead
bench's workload (tiny random Gemma 3, real tokenizer; S greedy streams of P + O tokens), run
alternately with no background load and with busy processes taking a given share of the cores.

The served stack runs its gateway, coordinator and Ray beside the shard worker; on a 2-core host
they take a few tenths of a core at ~2,000 tok/s, and the worker's multi-threaded kernels wait for
whichever thread was preempted. This bench measures that effect alone, with nothing served.

    .venv/bin/python bench/bench_contention.py [--streams 256] [--load 0.4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_overhead import prompts, tiny_checkpoint  # noqa: E402

PERIOD_S = 0.01  # each busy process spins for its share of every period and sleeps the rest


def busy(share: float, stop) -> None:
    """Keep `share` of one core busy until `stop` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < share * PERIOD_S:
            pass
        time.sleep((1 - share) * PERIOD_S)


def run_round(engine, texts: list[str], output_len: int, load: float, processes: int) -> dict:
    """One pass of the workload under `load` cores of background processes."""
    from gemma_dist import SamplingParams

    stop = mp.Event()
    burners = [mp.Process(target=busy, args=(load / processes, stop)) for _ in range(processes if load else 0)]
    for p in burners:
        p.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        tag = f"{load}-{time.monotonic()}-"
        for i, text in enumerate(texts):
            engine.add_request(tag + str(i), text, params)
        times, steps = engine.times, engine.times.steps
        forward, sample = times.forward, times.sample
        tokens, start = 0, time.perf_counter()
        while engine.has_unfinished_requests:
            tokens += sum(len(d.token_ids) for d in engine.step())
        wall = time.perf_counter() - start
        count = times.steps - steps
        return {"tok_s": tokens / wall, "forward": (times.forward - forward) / count,
                "sample": (times.sample - sample) / count}
    finally:
        stop.set()
        for p in burners:
            p.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--load", type=float, default=0.4, help="cores the background processes keep busy")
    parser.add_argument("--processes", type=int, default=2, help="background processes sharing the load")
    parser.add_argument("--rounds", type=int, default=2, help="passes of each condition, alternating")
    args = parser.parse_args()
    import torch

    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
    from gemma_dist.model.loading.default_model import cache_root

    model_dir = tiny_checkpoint(cache_root() / "bench-tiny-gemma3")
    engine = LLMEngine.from_model(str(model_dir), "float32", device="cpu", config=EngineConfig(
        max_num_seqs=args.streams, max_num_batched_tokens=max(4096, args.streams), kv_cache_memory=1 << 30))
    texts = prompts(args.streams, args.prompt_len, seed=args.streams)
    run_round(engine, texts[:4], 8, 0.0, args.processes)  # warm-up
    rows = []
    for _ in range(args.rounds):
        for load in (0.0, args.load):
            rows.append((load, run_round(engine, texts, args.output_len, load, args.processes)))
    print(f"\nin-process engine, tiny random Gemma 3, {args.streams} greedy streams of {args.prompt_len} + "
          f"{args.output_len} tokens, {torch.get_num_threads()} threads; background: {args.processes} processes "
          f"busy {args.load:g} cores in all\n")
    print("| background load (cores) | out tok/s | forward ms/step | sample ms/step (LM head + choice) |")
    print("|---|---|---|---|")
    for load, r in rows:
        print(f"| {load:g} | {r['tok_s']:.0f} | {r['forward'] * 1e3:.1f} | {r['sample'] * 1e3:.1f} |")
    quiet = [r["tok_s"] for load, r in rows if load == 0]
    loaded = [r["tok_s"] for load, r in rows if load]
    print(f"\nloaded / unloaded tok/s: {min(loaded) / max(quiet):.2f} to {max(loaded) / min(quiet):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

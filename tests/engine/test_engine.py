"""LLMEngine: continuous batching is invisible in the outputs.

Requests joining a running batch at different steps, chunked prefill, and preemption under a
tiny KV budget all give exactly the tokens each request gets alone (in batch-invariant mode,
where that holds bit for bit), on the real Gemma 3 270M and on tiny Gemma 1/2/3 configs.
Streaming deltas add up to the final output and never split a UTF-8 character.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from gemma_dist.config import KVLayout
from gemma_dist import SamplingParams
from gemma_dist.engine.llm_engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma_dist.engine.model_runner import kv_bytes_per_token
from gemma_dist.engine.sequence import FinishReason
from gemma_dist.model import layers
from gemma_dist.model.loading import load_model, open_checkpoint
from tests.helpers import make_tiny_hf_checkpoint, stable_prefix

GOLDEN = {c["kind"]: c for c in json.loads(
    (Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())["cases"]}


@pytest.fixture(scope="module", autouse=True)
def batch_invariant_mode():
    layers.set_batch_invariant(True)
    yield
    layers.set_batch_invariant(False)


def sixteen_requests(vocab: int, long_prompt: list[int]) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of 16 requests with different prompt and output lengths."""
    g = torch.Generator().manual_seed(1)
    requests = [(long_prompt, 6)]
    for i in range(15):
        n = int(torch.randint(3, 60, (1,), generator=g))
        requests.append(([2] + torch.randint(10, vocab, (n,), generator=g).tolist(), 3 + (i * 5) % 17))
    return requests


def run_alone(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request("alone", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests:
        for delta in engine.step():
            tokens += delta.token_ids
    return tokens


def run_staggered(engine: LLMEngine, requests, arrive_every: int = 2) -> dict[str, list[int]]:
    """Add the requests a few at a time, stepping in between; collect each one's tokens."""
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(requests))
    steps = 0
    while pending or engine.has_unfinished_requests:
        if pending and steps % arrive_every == 0:
            for i, (prompt, max_tokens) in pending[:3]:
                engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
                outputs[f"r{i}"] = []
            pending = pending[3:]
        for delta in engine.step():
            outputs[delta.request_id] += delta.token_ids
        steps += 1
    return outputs


def assert_invisible_batching(engine_factory, requests):
    alone = [run_alone(engine_factory(), p, n) for p, n in requests]
    together = run_staggered(engine_factory(), requests)
    for i, expected in enumerate(alone):
        assert together[f"r{i}"] == expected, f"request {i}"
        assert len(expected) == requests[i][1]


def test_sixteen_staggered_requests_equal_each_alone_real_model(default_llm):
    long_prompt = GOLDEN["long_over_window"]["prompt_token_ids"]  # > 512-token sliding window
    requests = sixteen_requests(default_llm.config.vocab_size, long_prompt)
    config = EngineConfig(kv_cache_memory=256 << 20, max_num_batched_tokens=256, max_num_seqs=16)
    assert_invisible_batching(lambda: LLMEngine(default_llm.model, default_llm.tokenizer, config), requests)


@pytest.fixture(scope="module", params=["gemma1", "gemma2", "gemma3"])
def tiny_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_checkpoint(request.param, directory)
    return load_model(open_checkpoint(directory), "float32")


def test_sixteen_staggered_requests_equal_each_alone_tiny(tiny_model, default_llm):
    g = torch.Generator().manual_seed(3)
    long_prompt = [2] + torch.randint(10, 500, (40,), generator=g).tolist()  # > the window of 8
    requests = sixteen_requests(500, long_prompt)
    config = EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
    assert_invisible_batching(lambda: LLMEngine(tiny_model, default_llm.tokenizer, config), requests)


@pytest.mark.parametrize("window_pool, blocks, chunk", [(False, 20, 64), (True, 12, 8)])
def test_preemption_under_a_tiny_kv_budget_gives_identical_outputs(tiny_model, default_llm, window_pool, blocks, chunk):
    """(With the sliding-window pool, 20 blocks hold all six: it needs a smaller budget to preempt.)"""
    g = torch.Generator().manual_seed(5)
    requests = [([2] + torch.randint(10, 500, (30,), generator=g).tolist(), 25) for _ in range(6)]
    per_block = kv_bytes_per_token(tiny_model, torch.float32) * 4
    if not KVLayout.of(tiny_model.config).windowed:  # (Gemma 1: no LOCAL layers, nothing to gain)
        blocks = 20
    tiny = EngineConfig(kv_cache_memory=per_block * blocks, block_size=4, max_num_batched_tokens=chunk, max_num_seqs=6,
                        kv_window_pool=window_pool)
    roomy = EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=64, max_num_seqs=6)
    alone = [run_alone(LLMEngine(tiny_model, default_llm.tokenizer, roomy), p, n) for p, n in requests]
    engine = LLMEngine(tiny_model, default_llm.tokenizer, tiny)
    together = run_staggered(engine, requests, arrive_every=1)
    assert engine.stats().preemptions > 0
    assert [together[f"r{i}"] for i in range(len(requests))] == alone
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_streamed_deltas_add_up_and_never_break_utf8(default_llm):
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20))
    cases = {"cjk": SamplingParams(temperature=0, max_tokens=30),
             "prose": SamplingParams(temperature=0, max_tokens=40, stop=["loud noise"]),
             "code": SamplingParams(temperature=0.8, seed=3, max_tokens=25, logprobs=2)}
    for kind, params in cases.items():
        engine.add_request(kind, GOLDEN[kind]["prompt"], params)
    deltas = {kind: [] for kind in cases}
    while engine.has_unfinished_requests:
        for delta in engine.step():
            deltas[delta.request_id].append(delta)
    for kind, params in cases.items():
        ds = deltas[kind]
        text = "".join(d.text for d in ds)
        tokens = [t for d in ds for t in d.token_ids]
        assert all("\ufffd" not in d.text for d in ds)
        assert ds[-1].finish_reason is not None and all(d.finish_reason is None for d in ds[:-1])
        assert ds[-1].completion_tokens == len(tokens) and ds[-1].prompt_tokens == len(GOLDEN[kind]["prompt_token_ids"])
        offline = default_llm.generate(GOLDEN[kind]["prompt"], params)[0]
        assert tokens == offline.token_ids and text == offline.text
        if params.stop:
            assert ds[-1].finish_reason is FinishReason.STOP and "loud noise" not in text
        if params.logprobs:
            assert sum(len(d.logprobs) for d in ds) == len(tokens)


def test_abort_frees_blocks_at_once(default_llm):
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20))
    total = engine.stats().total_blocks
    engine.add_request("a", GOLDEN["prose"]["prompt"], SamplingParams(max_tokens=100))
    engine.add_request("b", GOLDEN["code"]["prompt"], SamplingParams(max_tokens=100))
    engine.step()
    assert engine.stats().running == 2 and engine.stats().free_blocks < total
    final = engine.abort("a")
    assert final.finish_reason is FinishReason.ABORTED
    engine.abort("b")
    stats = engine.stats()
    assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, total)
    assert engine.abort("unknown") is None


def test_kv_budget_in_bytes_or_fraction(default_llm):
    per_token = kv_bytes_per_token(default_llm.model, torch.float32)
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=100 << 20))
    assert engine.stats().max_concurrent_tokens == (100 << 20) // (per_token * 16) * 16
    fraction = LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=0.01))
    assert fraction.stats().max_concurrent_tokens > 0
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=0)


def test_async_iterator_streams_and_cancels(default_llm):
    engine = AsyncLLMEngine(LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20)))

    async def collect(request_id, prompt, max_tokens):
        return [d async for d in engine.generate(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))]

    async def cancel_early():
        stream = engine.generate("cancelled", GOLDEN["digits"]["prompt"], SamplingParams(max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(collect("x", GOLDEN["prose"]["prompt"], 8),
                                       collect("y", GOLDEN["code"]["prompt"], 5), cancel_early())
        return results[0], results[1]

    try:
        x, y = asyncio.run(main())
        assert [t for d in x for t in d.token_ids] == stable_prefix(GOLDEN["prose"])[:8]
        assert [t for d in y for t in d.token_ids] == stable_prefix(GOLDEN["code"])[:5]
        stats = engine.stats()
        assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks)
    finally:
        engine.shutdown()


@pytest.fixture
def steps_of_at_least_50ms(default_llm):
    """Every forward of the model takes at least 50 ms (a decode step takes ~70 ms on the 2-core CI
    machine anyway). How many steps the engine thread runs before a command sent from the event
    loop takes effect is a race between the two; with a floor on the step time the bound asserted
    below holds on a machine with a much faster CPU too."""
    model = default_llm.model
    forward = model.forward

    def slowed(*args, **kwargs):
        start = time.monotonic()
        out = forward(*args, **kwargs)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - start)))
        return out

    model.forward = slowed
    yield
    del model.forward  # the class's forward again


def test_async_abort_bad_input_and_shutdown_never_hang(default_llm, steps_of_at_least_50ms):
    engine = AsyncLLMEngine(LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20)))

    async def aborted_from_outside():
        deltas = []
        async for delta in engine.generate("victim", GOLDEN["prose"]["prompt"], SamplingParams(max_tokens=500)):
            deltas.append(delta)
            if len(deltas) == 2:
                engine.abort("victim")
        return deltas

    async def bad_input():
        with pytest.raises(ValueError, match="prompt must not be empty"):
            async for _ in engine.generate("bad", "", SamplingParams()):
                pass

    async def stopped_mid_stream():
        from gemma_dist.engine.llm_engine import EngineStoppedError
        with pytest.raises(EngineStoppedError):
            async for _ in engine.generate("long", GOLDEN["code"]["prompt"], SamplingParams(max_tokens=500)):
                await asyncio.to_thread(engine.shutdown)

    async def main():
        deltas = await asyncio.wait_for(aborted_from_outside(), timeout=120)
        assert deltas[-1].finish_reason is FinishReason.ABORTED and len(deltas) <= 4
        await asyncio.wait_for(bad_input(), timeout=60)
        stats = engine.stats()
        assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks)
        await asyncio.wait_for(stopped_mid_stream(), timeout=120)

    asyncio.run(main())

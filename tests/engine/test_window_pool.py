"""The sliding-window KV pool in a real engine: LOCAL layers give back the blocks their window has
left, and nothing a request returns changes.

The pool changes only which pages hold a layer's K/V, never which values attention reads or in
what order, so an engine with the pool and one without (`kv_window_pool=False`) return the same
tokens and bitwise the same logprobs on the same workload, also through prefix-cache hits past
the window and preemptions.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist import SamplingParams
from gemma_dist.config import KVLayout
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.engine.model_runner import kv_bytes_per_token
from gemma_dist.model.loading import load_model, open_checkpoint
from tests.helpers import assert_greedy_agrees, make_tiny_hf_checkpoint

BLOCK = 4  # the tiny models' window is 8 positions: two blocks


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def windowed_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_checkpoint(request.param, directory)
    model = load_model(open_checkpoint(directory), "float32")
    assert KVLayout.of(model.config).windowed
    return model


def workload(seed: int = 7) -> list[tuple[list[int], SamplingParams]]:
    """Prompts well past the window (two share a 24-token prefix), greedy and seeded, with logprobs."""
    g = torch.Generator().manual_seed(seed)
    shared = [2] + torch.randint(10, 500, (23,), generator=g).tolist()
    out = []
    for i in range(8):
        prompt = (shared if i < 2 else [2]) + torch.randint(10, 500, (5 + 7 * i,), generator=g).tolist()
        params = SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=12 + i, logprobs=2,
                                ignore_eos=True)
        out.append((prompt, params))
    return out


def serve(engine: LLMEngine, requests, arrive_every: int = 2) -> tuple[dict, int]:
    """Run the requests, a few arriving every other step; (request id → (tokens, logprobs)), and the
    most pages LOCAL layers held at once."""
    outputs, pending, steps, most_local = {}, list(enumerate(requests)), 0, 0
    while pending or engine.has_unfinished_requests:
        if pending and steps % arrive_every == 0:
            for i, (prompt, params) in pending[:3]:
                engine.add_request(f"r{i}", prompt, params)
                outputs[f"r{i}"] = ([], [])
            pending = pending[3:]
        for delta in engine.step():
            outputs[delta.request_id][0].extend(delta.token_ids)
            outputs[delta.request_id][1].extend(delta.logprobs)
        most_local = max(most_local, engine.stats().local_pages_used)
        steps += 1
    return outputs, most_local


def engine_of(model, tokenizer, window_pool: bool, blocks: int = 400, chunk: int = 16) -> LLMEngine:
    per_block = kv_bytes_per_token(model, torch.float32) * BLOCK
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=per_block * blocks, block_size=BLOCK,
                                                    max_num_batched_tokens=chunk, max_num_seqs=8,
                                                    kv_window_pool=window_pool))


def test_the_pool_returns_what_one_table_returns_and_holds_only_windows(windowed_model, default_llm):
    requests = workload()
    pooled = engine_of(windowed_model, default_llm.tokenizer, window_pool=True)
    single = engine_of(windowed_model, default_llm.tokenizer, window_pool=False)
    with_pool, most_local = serve(pooled, requests)
    without, _ = serve(single, requests)
    assert with_pool == without  # tokens and logprobs, bit for bit
    layout = KVLayout.of(windowed_model.config)
    local_groups = sum(layout.group_local)
    # Each LOCAL group of a running sequence holds its window (2 blocks) plus a chunk's new blocks
    # (16 positions: 4) plus one partial block, at most; never its context (up to 77 positions: 20 blocks).
    assert most_local <= 8 * local_groups * (2 + 4 + 1)
    stats = pooled.stats()
    assert stats.kv_groups == layout.num_groups and stats.free_blocks == stats.total_blocks
    assert stats.global_pages_used == stats.local_pages_used == 0
    assert stats.prefix_cache_hits > 0  # the shared prefix was reused past the window


def test_a_budget_too_small_for_one_table_serves_long_requests_with_the_pool(windowed_model, default_llm):
    """80 positions need 20 blocks for every layer; a 14-block budget holds them with the pool
    (preempting as it must), and the greedy tokens equal a roomy engine's (up to its first near-tie:
    a preempted sequence recomputes in other chunks, which may move last bits)."""
    g = torch.Generator().manual_seed(9)
    requests = [([2] + torch.randint(10, 500, (40,), generator=g).tolist(),
                 SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)) for _ in range(3)]
    tight = engine_of(windowed_model, default_llm.tokenizer, window_pool=True, blocks=14, chunk=8)
    roomy = engine_of(windowed_model, default_llm.tokenizer, window_pool=True)
    got, want = serve(tight, requests)[0], serve(roomy, requests)[0]
    for request_id, (tokens, logprobs) in want.items():
        margins = [lp.top[0][1] - lp.top[1][1] for lp in logprobs]
        assert assert_greedy_agrees(got[request_id][0], tokens, margins, what=request_id) >= 10
    assert tight.stats().preemptions > 0 and tight.stats().free_blocks == tight.stats().total_blocks
    too_small = engine_of(windowed_model, default_llm.tokenizer, window_pool=False, blocks=14, chunk=8)
    with pytest.raises(ValueError, match="may need 80 tokens"):
        too_small.add_request("long", requests[0][0], requests[0][1])


def test_real_270m_past_its_window_frees_local_blocks_and_returns_the_same(default_llm):
    """Gemma 3 270M (window 512), a 700-token prompt and 6 greedy tokens: during the generation the
    5 LOCAL groups hold their windows only (stats()), and tokens and logprobs equal the one-table
    engine's bit for bit."""
    model, tokenizer = default_llm.model, default_llm.tokenizer
    g = torch.Generator().manual_seed(4)
    prompt = [2] + torch.randint(1000, 100_000, (699,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)
    runs = {}
    for window_pool in (True, False):
        engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=64 << 20, kv_window_pool=window_pool,
                                                          max_num_batched_tokens=256))
        engine.add_request("long", prompt, params)
        tokens, logprobs, local = [], [], []
        while engine.has_unfinished_requests:
            for delta in engine.step():
                tokens += delta.token_ids
                logprobs += delta.logprobs
            local.append(engine.stats().local_pages_used)
        runs[window_pool] = (tokens, logprobs)
        if window_pool:
            layout = KVLayout.of(model.config)
            local_groups = sum(layout.group_local)
            assert (layout.num_groups, local_groups) == (6, 5)
            # 706 positions: 45 blocks; a window of 512 reaches 33 of them (34 across a block edge),
            # plus the block the next step may have taken already.
            during = [pages for pages in local if pages]
            assert during and max(during[-4:]) <= local_groups * 35 < local_groups * 45
            assert engine.stats().local_pages_used == engine.stats().global_pages_used == 0  # all released
    assert runs[True] == runs[False]

"""Prefix caching on the real Gemma 3 270M: a request whose prompt starts like an earlier one
reuses its cached K/V blocks, and a hit changes nothing in what it returns.

Batch-invariant mode makes every row's numerics independent of what else its step computes, so
a sequence that computes only its suffix over cached blocks must match, bit for bit, the same
sequence computed in full on an engine without the cache: greedy and seeded tokens and logprobs.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist import SamplingParams
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.model import layers
from tests.helpers import assert_greedy_agrees

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def batch_invariant_mode():
    layers.set_batch_invariant(True)
    yield
    layers.set_batch_invariant(False)


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(1000, vocab // 2, (length - 1,), generator=g).tolist()


def run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams):
    """(token ids, logprobs) of one request run to the end."""
    engine.add_request(request_id, prompt, params)
    tokens, logprobs = [], []
    while engine.has_unfinished_requests:
        for delta in engine.step():
            tokens += delta.token_ids
            logprobs += delta.logprobs
    return tokens, logprobs


def engine_of(llm, caching: bool) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20, block_size=BLOCK,
                                                            prefix_caching=caching))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                                    SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=6, logprobs=2,
                                                   ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_a_cache_hit_changes_no_token_and_no_logprob(default_llm, params):
    vocab = default_llm.config.vocab_size
    shared = prompt_ids(vocab, 70, seed=1)  # four full blocks and 6 tokens
    first, second = shared + prompt_ids(vocab, 9, seed=2)[1:], shared + prompt_ids(vocab, 12, seed=3)[1:]
    cached = engine_of(default_llm, caching=True)
    run(cached, "first", first, params)
    hit = run(cached, "second", second, params)
    stats = cached.stats()
    assert stats.prefix_cache_hits == 4 * BLOCK  # the shared full blocks, not the partial fifth
    assert stats.prefix_cache_queries == len(first) - 1 + len(second) - 1
    assert stats.cached_blocks >= (len(first) + 5) // BLOCK
    assert run(engine_of(default_llm, caching=False), "second", second, params) == hit


def test_without_prefix_caching_nothing_is_looked_up_or_kept(default_llm):
    engine = engine_of(default_llm, caching=False)
    prompt = prompt_ids(default_llm.config.vocab_size, 40, seed=4)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    run(engine, "a", prompt, params)
    run(engine, "b", prompt, params)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.cached_blocks) == (0, 0, 0)
    assert stats.free_blocks == stats.total_blocks


def test_cached_blocks_count_as_free_and_give_way_under_memory_pressure(default_llm):
    """A cache of 8 blocks serves many different 40-token prompts one after another: cached blocks
    of finished requests are reused for new ones, and outputs stay those of a cold engine."""
    engine = LLMEngine(default_llm.model, default_llm.tokenizer,
                       EngineConfig(kv_cache_memory=8 * BLOCK * 36_864, block_size=BLOCK))
    assert engine.stats().total_blocks == 8 * engine.stats().kv_groups  # pages: 8 blocks for all 18 layers
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    cold = engine_of(default_llm, caching=False)
    for seed in range(5):
        prompt = prompt_ids(default_llm.config.vocab_size, 40, seed=10 + seed)
        assert run(engine, f"r{seed}", prompt, params) == run(cold, f"r{seed}", prompt, params)
        stats = engine.stats()
        assert stats.free_blocks == stats.total_blocks and 0 < stats.cached_blocks <= 8
        assert stats.global_pages_used == stats.local_pages_used == 0


def test_a_hit_past_the_sliding_window_gives_the_same_tokens(default_llm):
    """A 600-token shared prefix, beyond Gemma 3's 512-token local window. Past the window even
    batch-invariant mode is not invariant to where a prefill chunk starts (a cold prompt chunked
    differently changes last bits the same way), so: the same greedy tokens up to the first near-tie,
    logprobs equal to float32 rounding."""
    vocab = default_llm.config.vocab_size
    shared = prompt_ids(vocab, 600, seed=5)
    first, second = shared + prompt_ids(vocab, 8, seed=6)[1:], shared + prompt_ids(vocab, 5, seed=7)[1:]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)
    cached = engine_of(default_llm, caching=True)
    run(cached, "first", first, params)
    hit_tokens, hit_logprobs = run(cached, "second", second, params)
    assert cached.stats().prefix_cache_hits == 600 // BLOCK * BLOCK
    cold_tokens, cold_logprobs = run(engine_of(default_llm, caching=False), "second", second, params)
    margins = [lp.top[0][1] - lp.top[1][1] for lp in cold_logprobs]
    compared = assert_greedy_agrees(hit_tokens, cold_tokens, margins, what="cache hit vs cold")
    assert compared >= 3
    for hit, cold in zip(hit_logprobs[:compared], cold_logprobs[:compared]):
        assert hit.logprob == pytest.approx(cold.logprob, abs=1e-4)


def test_forked_samples_equal_lone_requests_bit_for_bit(default_llm):
    """n samples of one prompt: samples 1..3 arrive once sample 0 has its first token, forked from
    it (its full blocks shared, its partial block copied by the runner: copy-on-write), and compute
    only the prompt's last token; each equals the same request computed alone (tokens bit for bit)."""
    prompt = prompt_ids(default_llm.config.vocab_size, 70, seed=4)  # 69 positions to take: 4 blocks + 5
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=20 + i, max_tokens=6, logprobs=2, ignore_eos=True)
              for i in range(4)]
    engine = engine_of(default_llm, caching=True)
    got = {i: ([], []) for i in range(4)}

    def collect(deltas):
        for delta in deltas:
            tokens, logprobs = got[int(delta.request_id[1:])]
            tokens += delta.token_ids
            logprobs += delta.logprobs

    engine.add_request("s0", prompt, params[0])
    while not got[0][0]:
        collect(engine.step())
    for i in range(1, 4):
        engine.add_request(f"s{i}", prompt, params[i], fork_of="s0")
    while engine.has_unfinished_requests:
        collect(engine.step())
    stats = engine.stats()
    assert stats.copied_pages == 3 * stats.kv_groups  # one partial block (a page per group) per fork
    assert stats.prefix_cache_hits == 3 * 69  # every position but the last, shared or copied
    assert stats.free_blocks == stats.total_blocks
    alone = engine_of(default_llm, caching=False)
    for i in range(4):
        tokens, logprobs = run(alone, f"alone{i}", prompt, params[i])
        assert tokens == got[i][0], f"sample {i}"
        # (the logprobs' log-sum-exp over a batch of 4 rows may differ in the last bit from a batch
        # of 1, fork or no fork; the tokens, drawn from each row alone, may not)
        assert [[t for t, _ in lp.top] for lp in got[i][1]] == [[t for t, _ in lp.top] for lp in logprobs]
        values = [[lp.logprob, *[p for _, p in lp.top]] for lp in logprobs]
        assert sum([[lp.logprob, *[p for _, p in lp.top]] for lp in got[i][1]], []) == \
            pytest.approx(sum(values, []), abs=1e-5)
    assert len({tuple(tokens) for tokens, _ in got.values()}) > 1  # different seeds, different samples

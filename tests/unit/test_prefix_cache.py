"""Prefix caching in the block manager and the scheduler (plain Python, simulated model).

The simulated engine (tests/unit/test_scheduler.py) keeps a fake paged KV cache and samples
from the context it *reads back from the cache*, so a block shared under the wrong prefix, or
reused while another sequence still reads it, changes an output or trips its assertion.
"""

from __future__ import annotations

import random

import pytest

from gemma_dist.engine.block_manager import NO_PAGE, BlockManager, chain_key, chain_keys
from gemma_dist.engine.sequence import Sequence
from tests.unit.test_scheduler import BIG_CONTEXT, Params, SimEngine, fake_token


def seq_of(request_id: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(request_id=request_id, prompt_token_ids=list(prompt), params=Params(max_tokens=max_tokens),
                    eos_token_ids=frozenset(), max_context=BIG_CONTEXT)


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates for `prompt` (it depends on the context only)."""
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(fake_token(context))
    return context[len(prompt):]


SHARED = [100 + i for i in range(12)]  # three full blocks of 4


# ---------------------------------------------------------------------------------- keys


def test_equal_blocks_under_different_prefixes_have_different_keys():
    a = chain_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chain_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, different parents
    assert a == chain_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)  # the partial last block has no key
    assert a[1] == chain_key(a[0], [5, 6, 7, 8])


def test_chain_keys_extends_the_keys_already_known():
    tokens = list(range(20))
    known = chain_keys(tokens, 4, num_tokens=8)
    assert chain_keys(tokens, 4, known) is known and known == chain_keys(tokens, 4)


# ---------------------------------------------------------------------------------- BlockManager


def test_released_cached_blocks_stay_findable_and_count_as_free():
    blocks = BlockManager(4, 4, caching=True)
    table: list[int] = []
    blocks.grow(table, 8)
    keys = chain_keys(list(range(8)), 4)
    for key, block in zip(keys, table):
        blocks.register(key, block)
    held = list(table)
    blocks.release(table)
    assert blocks.num_free == 4 and blocks.num_cached == 2
    assert blocks.cached_prefix(keys) == held and blocks.unowned(held) == 2
    shared = blocks.share(held)
    assert blocks.num_free == 2 and blocks.unowned(shared) == 0


def test_never_registered_blocks_are_reused_before_cached_ones_and_eviction_is_lru():
    blocks = BlockManager(4, 4, caching=True)
    first, second = [], []
    blocks.grow(first, 4)
    blocks.grow(second, 4)
    k1, k2 = chain_key(None, [1, 1, 1, 1]), chain_key(None, [2, 2, 2, 2])
    blocks.register(k1, first[0])
    blocks.register(k2, second[0])
    cached_first, cached_second = first[0], second[0]
    blocks.release(first)  # released first: evicted first
    blocks.release(second)
    table: list[int] = []
    blocks.grow(table, 8)  # the two never-registered blocks
    assert cached_first not in table and cached_second not in table and blocks.num_cached == 2
    blocks.grow(table, 12)  # now one cached block must go: the least recently released
    assert table[-1] == cached_first and blocks.cached_prefix([k1]) == []
    assert blocks.cached_prefix([k2]) == [cached_second]


def test_a_released_prefix_loses_its_tail_before_its_head():
    blocks = BlockManager(3, 4, caching=True)
    table: list[int] = []
    blocks.grow(table, 12)
    keys = chain_keys(list(range(12)), 4)
    for key, block in zip(keys, table):
        blocks.register(key, block)
    blocks.release(table)
    blocks.grow([], 4)  # one block needed: the prefix's last block is evicted
    assert blocks.cached_prefix(keys) == blocks.cached_prefix(keys[:2]) and len(blocks.cached_prefix(keys)) == 2


def test_a_key_already_cached_keeps_its_block():
    blocks = BlockManager(4, 4, caching=True)
    a, b = [], []
    blocks.grow(a, 4)
    blocks.grow(b, 4)
    key = chain_key(None, [7, 7, 7, 7])
    blocks.register(key, a[0])
    blocks.register(key, b[0])  # the same content computed twice: the first stays the cached one
    assert blocks.cached_prefix([key]) == [a[0]]
    blocks.release(b)
    assert blocks.num_cached == 1


def test_without_caching_nothing_is_registered():
    blocks = BlockManager(4, 4)
    table: list[int] = []
    blocks.grow(table, 4)
    key = chain_key(None, [1, 2, 3, 4])
    blocks.register(key, table[0])
    assert blocks.cached_prefix([key]) == [] and blocks.num_cached == 0


# ---------------------------------------------------------------------------------- scheduler


def test_a_request_sharing_a_prefix_computes_only_its_suffix():
    engine = SimEngine(num_blocks=32, block_size=4, caching=True)
    first = engine.add(seq_of("a", SHARED + [1, 2], max_tokens=3))
    engine.run()
    second = engine.add(seq_of("b", SHARED + [5, 6, 7], max_tokens=3))
    step = engine.step()
    assert step.chunk("b") == (3, True)  # 12 of 15 prompt tokens came from the cache
    engine.run()
    assert first.output_token_ids == expected_output(SHARED + [1, 2], 3)
    assert second.output_token_ids == expected_output(SHARED + [5, 6, 7], 3)
    s = engine.scheduler
    assert (s.prefix_queried_tokens, s.prefix_hit_tokens) == (13 + 14, 12)


def test_the_last_prompt_token_is_always_computed():
    engine = SimEngine(num_blocks=32, block_size=4, caching=True)
    engine.add(seq_of("a", SHARED, max_tokens=2))
    engine.run()
    again = engine.add(seq_of("b", SHARED, max_tokens=2))
    assert engine.step().chunk("b") == (4, True)  # two blocks shared, the third recomputed for its logits
    engine.run()
    assert again.output_token_ids == expected_output(SHARED, 2)


def test_the_same_block_after_a_different_prefix_is_not_shared():
    engine = SimEngine(num_blocks=32, block_size=4, caching=True)
    engine.add(seq_of("a", SHARED + [1], max_tokens=1))
    engine.run()
    other = [999] + SHARED[1:] + [1]  # differs in the first block only
    seq = engine.add(seq_of("b", other, max_tokens=2))
    assert engine.step().chunk("b") == (13, True)
    engine.run()
    assert seq.output_token_ids == expected_output(other, 2) and engine.scheduler.prefix_hit_tokens == 0


def test_generated_tokens_are_cached_too():
    """A follow-up that repeats a finished request's prompt and output (a chat's next turn) reuses both."""
    engine = SimEngine(num_blocks=32, block_size=4, caching=True)
    first = engine.add(seq_of("a", SHARED[:6], max_tokens=7))
    engine.run()
    turn = first.all_token_ids + [3, 4]  # 13 tokens + 2: the first three blocks are all cached
    engine.add(seq_of("b", turn, max_tokens=1))
    assert engine.step().chunk("b") == (3, True)


def test_concurrent_requests_share_a_prefix_while_it_is_in_use():
    engine = SimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=16, caching=True)
    engine.add(seq_of("a", SHARED + [1], max_tokens=8))
    engine.step()  # a's prompt is computed; a keeps decoding
    b = engine.add(seq_of("b", SHARED + [2], max_tokens=8))
    step = engine.step()
    assert step.chunk("b") == (1, True)
    a_table = next(s for s in engine.scheduler.running if s.request_id == "a").block_table
    assert b.block_table[:3] == a_table[:3] and b.block_table[3] != a_table[3]
    engine.run()
    assert b.output_token_ids == expected_output(SHARED + [2], 8)


def test_cached_blocks_give_way_to_new_requests_on_a_full_cache():
    engine = SimEngine(num_blocks=8, block_size=4, max_num_seqs=2, caching=True)
    done = [engine.add(seq_of(f"r{i}", [i * 50 + j for j in range(13)], max_tokens=3)) for i in range(6)]
    engine.run()
    for seq in done:
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 3)
    assert engine.blocks.num_free == 8 and engine.blocks.num_cached <= 8


def test_many_requests_with_shared_prefixes_on_a_tiny_cache_match_their_expected_outputs():
    """Random prefixes from a few families, preemption and eviction all happen; every output is right."""
    rng = random.Random(0)
    engine = SimEngine(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=24, caching=True)
    families = [[rng.randrange(100, 200) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    seqs = []
    for i in range(40):
        prompt = rng.choice(families) + [rng.randrange(100, 200) for _ in range(rng.randrange(1, 6))]
        seqs.append(engine.add(seq_of(f"r{i}", prompt, max_tokens=rng.randrange(1, 10))))
        if rng.random() < 0.5:
            engine.step()
    engine.run()
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, seq.params.max_tokens), seq.request_id
    assert engine.scheduler.prefix_hit_tokens > 0 and engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free == 16


def test_a_preempted_sequence_resumes_correctly_whatever_of_its_blocks_survived():
    """Three 8-token prompts (12 output tokens each) in 12 blocks of 4: the newest is preempted, its
    registered blocks wait among the free ones and are reused by the others as they grow; it
    resumes from whatever is still cached, and every output is right."""
    engine = SimEngine(num_blocks=12, block_size=4, max_num_seqs=4, caching=True)
    seqs = [engine.add(seq_of(f"r{i}", [i * 40 + j for j in range(8)], max_tokens=12)) for i in range(3)]
    while not engine.step().plan.preempted:
        pass
    victim = seqs[-1]
    assert victim.registered_blocks == 0 and engine.blocks.num_cached > 0
    engine.run()
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 12)
    assert engine.blocks.num_free == 12


def assert_block_invariants(engine: SimEngine) -> None:
    """Reference counts equal the tables that hold each block; the free pool is exactly the
    unreferenced blocks, each once; a cached key names its block and only registered blocks wait
    as evictable."""
    blocks = engine.blocks
    held: dict[int, int] = {}
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        for entry in seq.block_table:
            for page in entry:
                if page != NO_PAGE:
                    held[page] = held.get(page, 0) + 1
    assert [blocks._refs[b] for b in range(blocks.num_blocks)] == [held.get(b, 0) for b in range(blocks.num_blocks)]
    pool = list(blocks._free) + list(blocks._evictable)
    assert len(pool) == len(set(pool)) == blocks.num_free
    assert set(pool) == {b for b in range(blocks.num_blocks) if b not in held}
    assert blocks.owned_global + blocks.owned_local == len(held)
    assert all(blocks._key_of[b] is not None for b in blocks._evictable)
    assert all(blocks._key_of[b] is None for b in blocks._free)
    for group, cache in enumerate(blocks._cached):
        assert all(blocks._key_of[page] == key and blocks._group_of[page] == group for key, page in cache.items())


def run_random_workload(engine: SimEngine, seed: int, requests: int = 50, max_family: int = 13,
                        max_output: int = 20) -> set[str]:
    """Requests from 3 prompt families with random suffixes, steps and aborts in between, checking
    every block invariant after each change; all outputs must be the fake model's. Returns the
    aborted request ids."""
    rng = random.Random(seed)
    families = [[rng.randrange(100, 200) for _ in range(rng.randrange(3, max_family))] for _ in range(3)]
    seqs, aborted = [], set()
    for i in range(requests):
        prompt = rng.choice(families) + [rng.randrange(100, 200) for _ in range(rng.randrange(1, 5))]
        seqs.append(engine.add(seq_of(f"r{i}", prompt, max_tokens=rng.randrange(1, max_output))))
        for _ in range(rng.randrange(0, 3)):
            engine.step()
            assert_block_invariants(engine)
        live = [s for s in seqs if not s.is_finished]
        if live and rng.random() < 0.3:
            victim = rng.choice(live)
            assert engine.scheduler.abort(victim.request_id) is victim
            aborted.add(victim.request_id)
            assert_block_invariants(engine)
    while engine.scheduler.has_unfinished:
        engine.step()
        assert_block_invariants(engine)
    for seq in seqs:
        if seq.request_id not in aborted:
            assert seq.output_token_ids == expected_output(seq.prompt_token_ids, seq.params.max_tokens)
    return aborted


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_with_aborts_and_preemptions_keep_every_block_invariant(seed):
    engine = SimEngine(num_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, caching=True)
    aborted = run_random_workload(engine, seed)
    assert engine.blocks.num_free == 10 and engine.scheduler.num_preemptions > 0
    assert engine.scheduler.prefix_hit_tokens > 0 and aborted

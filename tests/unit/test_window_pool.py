"""The sliding-window KV pool in the block manager and the scheduler (plain Python, simulated model).

The simulated engine (tests/unit/test_scheduler.py) writes every group's page of each position
and reads back, for each sampled token, the whole context from the GLOBAL groups' pages and the
window from the LOCAL groups' pages: a LOCAL page freed while its window still reaches it, or
reused by another sequence meanwhile, changes an output or trips an assertion.
"""

from __future__ import annotations

import pytest

from gemma_dist.config import VARIANTS, KVLayout
from gemma_dist.engine.block_manager import NO_PAGE, BlockManager, chain_keys
from tests.unit.test_prefix_cache import assert_block_invariants, expected_output, run_random_workload, seq_of
from tests.unit.test_scheduler import SimEngine

# One GLOBAL group and two LOCAL groups, blocks of 4 positions, a window of 8 positions.
LAYOUT = {"group_local": (False, True, True), "sliding_window": 8, "block_size": 4}


def windowed_engine(num_blocks: int, caching: bool = False, **limits) -> SimEngine:
    return SimEngine(num_blocks=num_blocks, caching=caching, **LAYOUT, **limits)


# ---------------------------------------------------------------------------------- layout


def test_gemma3_layout_groups_local_and_global_layers_in_full_pages():
    layout = KVLayout.of(VARIANTS["gemma-3-270m"])  # 15 LOCAL + 3 GLOBAL layers
    assert (layout.num_groups, layout.group_size, sum(layout.group_local)) == (6, 3, 5)
    kinds = VARIANTS["gemma-3-270m"].layer_kinds
    for group in range(layout.num_groups):
        layers = [i for i, g in enumerate(layout.layer_group) if g == group]
        assert sorted(layout.layer_slot[i] for i in layers) == [0, 1, 2]  # a full page, each slot once
        assert {kinds[i].value for i in layers} == {"local" if layout.group_local[group] else "global"}
    assert KVLayout.of(VARIANTS["gemma-3-270m"], window_pool=False).num_groups == 1
    assert KVLayout.of(VARIANTS["gemma-2b"]).num_groups == 1  # Gemma 1: no LOCAL layers


def test_capacity_at_8k_contexts_is_over_4x_for_gemma3_270m():
    """Pages one 8,192-token sequence holds at most, pool on vs off, in the same bytes (a page of
    the pool holds 3 of the 18 layers, a block of the single table all 18)."""
    config = VARIANTS["gemma-3-270m"]
    layout = KVLayout.of(config)
    pooled = BlockManager(10_000, 16, group_local=layout.group_local, sliding_window=layout.sliding_window)
    single = BlockManager(10_000, 16)
    pooled_bytes = pooled.pages_to_hold(8192, 16) * layout.group_size
    single_bytes = single.pages_to_hold(8192, 16) * config.num_layers
    assert single_bytes / pooled_bytes >= 4.0


# ---------------------------------------------------------------------------------- BlockManager


def test_free_outside_window_gives_back_only_local_pages_the_window_left():
    blocks = BlockManager(30, **LAYOUT)
    table = []
    blocks.grow(table, 20)  # 5 blocks x 3 groups
    assert blocks.num_free == 15 and (blocks.owned_global, blocks.owned_local) == (5, 10)
    # A query at position 12 reads positions 5..12: blocks 1..3 stay, block 0 leaves.
    assert blocks.free_outside_window(table, 0, 12) == 1
    assert table[0][1:] == (NO_PAGE, NO_PAGE) and table[0][0] != NO_PAGE
    assert blocks.num_free == 17 and (blocks.owned_global, blocks.owned_local) == (5, 8)
    assert blocks.free_outside_window(table, 1, 12) == 1  # nothing more
    blocks.release(table)
    assert blocks.num_free == 30 and (blocks.owned_global, blocks.owned_local) == (0, 0)


def test_a_cached_prefix_needs_local_pages_only_inside_the_window_at_its_end():
    blocks = BlockManager(60, caching=True, **LAYOUT)
    tokens = list(range(100, 124))  # 6 full blocks
    keys = chain_keys(tokens, 4)
    table = []
    blocks.grow(table, 24)
    for key, entry in zip(keys, table):
        blocks.register(key, entry)
    blocks.free_outside_window(table, 0, 24)  # blocks 0..3 leave the window of position 24
    hit = blocks.cached_prefix(keys)
    assert len(hit) == 6
    assert all(entry[1:] == (NO_PAGE, NO_PAGE) for entry in hit[:4])  # before the window: not needed
    assert hit[4:] == table[4:] and [e[0] for e in hit] == [e[0] for e in table]
    # Freed LOCAL pages stay findable until reused; a shorter prefix then needs them too.
    assert len(blocks.cached_prefix(keys[:3])) == 3
    blocks.release(table)
    while blocks._free:  # take every never-registered page: the next ones evict cached pages
        blocks._take_free(0)
    for _ in range(8):  # evict the least recently released: the LOCAL pages the window left
        blocks._take_free(0)
    assert len(blocks.cached_prefix(keys)) == 6  # the whole prefix needs none of them
    assert blocks.cached_prefix(keys[:3]) == []  # a prefix ending at block 3 needs blocks 0..2's


# ---------------------------------------------------------------------------------- scheduler


def test_long_sequences_hold_their_window_not_their_context_in_local_groups():
    engine = windowed_engine(num_blocks=40, max_num_batched_tokens=8)
    seq = engine.add(seq_of("long", [7] * 10, max_tokens=40))
    most_local = 0
    while engine.scheduler.has_unfinished:
        engine.step()
        most_local = max(most_local, engine.blocks.owned_local)
        assert_block_invariants(engine)
    assert seq.output_token_ids == expected_output([7] * 10, 40)
    # 50 positions: 13 blocks in the GLOBAL group; LOCAL groups never held more than the window
    # (8 positions: 2-3 blocks) plus a step's new block, each.
    assert most_local <= 2 * 4
    assert engine.blocks.num_free == 40


def test_a_sequence_longer_than_the_cache_fits_with_the_pool():
    """80 positions: 20 blocks; one table for every group would need 60 pages of the 40."""
    engine = windowed_engine(num_blocks=40, max_num_batched_tokens=8)
    seq = engine.add(seq_of("long", [3] * 4, max_tokens=76))
    engine.run()
    assert seq.output_token_ids == expected_output([3] * 4, 76)
    with pytest.raises(ValueError, match="may need"):
        SimEngine(num_blocks=40, block_size=4, max_num_batched_tokens=8, group_local=(False, False, False)).add(
            seq_of("long", [3] * 4, max_tokens=76))


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_with_prefixes_aborts_and_preemptions_keep_every_page_invariant(seed):
    engine = windowed_engine(num_blocks=36, caching=True, max_num_seqs=4, max_num_batched_tokens=12)
    run_random_workload(engine, seed, requests=40, max_family=20, max_output=24)
    assert engine.blocks.num_free == 36 and engine.blocks.owned_local == engine.blocks.owned_global == 0
    assert engine.scheduler.prefix_hit_tokens > 0 and engine.scheduler.num_preemptions > 0


def test_prefix_hits_past_the_window_share_global_pages_and_the_window_only():
    engine = windowed_engine(num_blocks=60, caching=True, max_num_batched_tokens=64)
    prompt = list(range(100, 124))  # 6 full blocks, longer than the window
    first = engine.add(seq_of("a", prompt + [1], max_tokens=2))
    engine.run()
    second = engine.add(seq_of("b", prompt + [2], max_tokens=2))
    engine.step()
    assert second.num_cached >= 24 - 4  # the prefix came from the cache (all but maybe its last block)
    assert second.output_token_ids[:1] == expected_output(prompt + [2], 2)[:1]
    engine.run()
    assert first.output_token_ids == expected_output(prompt + [1], 2)
    assert second.output_token_ids == expected_output(prompt + [2], 2)

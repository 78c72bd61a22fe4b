"""Padded shapes for compiled backends: every call fits a bucket, and warm-up lists them all."""

from __future__ import annotations

import math
import random

import pytest

from gemma_dist.engine.buckets import GraphShape, ShapeBuckets, pick, powers_of_two_up_to


def test_powers_of_two_end_at_the_limit():
    assert powers_of_two_up_to(64) == (1, 2, 4, 8, 16, 32, 64)
    assert powers_of_two_up_to(48, 16) == (16, 32, 48)
    assert powers_of_two_up_to(1) == (1,)
    with pytest.raises(ValueError, match="limit"):
        powers_of_two_up_to(0)


def test_pick_the_smallest_bucket_that_fits():
    assert pick((1, 8, 16), 1, "x") == 1
    assert pick((1, 8, 16), 2, "x") == 8
    assert pick((1, 8, 16), 16, "x") == 16
    with pytest.raises(ValueError, match="decode batch 17 exceeds the largest compiled bucket 16"):
        pick((1, 8, 16), 17, "decode batch")


def test_limits_become_buckets():
    b = ShapeBuckets.for_limits(max_num_seqs=64, max_chunk_tokens=2048, max_model_len=4096, block_size=16)
    assert b.batch_sizes == (1, 8, 16, 32, 64)  # 2..7 rows pad to 8
    assert b.chunk_lengths == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert b.context_blocks == (8, 16, 32, 64, 128, 256)
    assert b.max_model_len == 4096


def test_small_limits_still_cover_themselves():
    b = ShapeBuckets.for_limits(max_num_seqs=4, max_chunk_tokens=32, max_model_len=96, block_size=4)
    assert b.batch_sizes == (1, 8)
    assert b.chunk_lengths == (16, 32)
    assert b.context_blocks == (24,)  # 96 tokens / 4 per block; under the 128-token minimum


def test_invalid_buckets_are_refused():
    with pytest.raises(ValueError, match="batch_sizes"):
        ShapeBuckets(4, (8, 1), (16,), (4,))
    with pytest.raises(ValueError, match="block_size"):
        ShapeBuckets(0, (1,), (16,), (4,))


def test_every_reachable_call_shape_is_warmed_up():
    """Random decode batches and prompt chunks within the limits always land on a listed shape."""
    b = ShapeBuckets.for_limits(max_num_seqs=16, max_chunk_tokens=128, max_model_len=512, block_size=16)
    shapes = set(b.graph_shapes())
    rng = random.Random(0)
    for _ in range(2000):
        if rng.random() < 0.5:
            rows = rng.randint(1, 16)
            longest = rng.randint(1, 512)
            shape = b.decode_shape(rows, math.ceil(longest / 16))
        else:
            chunk = rng.randint(2, 128)
            cached = rng.randint(0, 512 - chunk)
            shape = b.prefill_shape(chunk, math.ceil((cached + chunk) / 16))
        assert shape in shapes, shape
    # and nothing listed is unreachable: prefill shapes need at least the chunk's blocks
    for s in shapes:
        if not s.is_decode:
            assert s.blocks * 16 >= s.query_len // 2


def test_graph_count_is_bounded():
    b = ShapeBuckets.for_limits(max_num_seqs=64, max_chunk_tokens=512, max_model_len=4096, block_size=16)
    shapes = b.graph_shapes()
    assert len(shapes) == len(set(shapes))
    decode = [s for s in shapes if s.is_decode]
    assert len(decode) == len(b.batch_sizes) * len(b.context_blocks)
    assert len(shapes) <= len(decode) + len(b.chunk_lengths) * len(b.context_blocks)
    assert GraphShape(1, 512, 32) in shapes and GraphShape(1, 512, 16) not in shapes  # 512 tokens need 32 blocks


def test_default_xla_tp_is_the_largest_even_split_of_the_devices():
    from gemma_dist.config import get_variant
    from gemma_dist.engine.xla_runner import default_tp

    tiny = get_variant("gemma-3-270m")  # 4 query heads, 1 KV head
    assert default_tp(tiny, 8) == 4  # 8 chips: 4-way shards, 2 copies
    assert default_tp(tiny, 4) == 4
    assert default_tp(tiny, 6) == 2
    assert default_tp(get_variant("gemma-2-9b"), 8) == 8  # 16 heads, 8 KV heads
    assert default_tp(get_variant("gemma-2-9b"), 1) == 1

"""Native decode attention (gemma_dist/model/native/decode_attention.c behind layers.paged_attention).

Decode rows (one new token per sequence) of fp32 CPU steps read their keys and values in place
through the block tables instead of gathering them. The kernel must give what the torch form gives
to fp32 rounding (its sums run in another order) for every layout the model uses (GQA, sliding
windows, softcaps, pages out of order, rows mixed with prefill chunks), and each row the same bits
whatever shares its step or however many threads run.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.model import layers
from gemma_dist.model.attention import build_attention_metadata
from gemma_dist.model.native import cpu_has_avx2
from tests.helpers import shuffled_block_tables

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="native decode attention needs AVX2 + FMA (x86-64)")
BLOCK = 4


def step(cached: list[int], query_lens: list[int], hkv: int, d: int, seed: int = 0, pages: int = 64):
    """Random caches, block tables (pages shuffled) and the step's metadata and queries."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(pages, BLOCK, hkv, d, generator=gen)
    v_cache = torch.randn(pages, BLOCK, hkv, d, generator=gen)
    order = torch.randperm(pages, generator=gen).tolist()
    return k_cache, v_cache, shuffled_block_tables(order, cached, query_lens, BLOCK)


def attention(q, k_cache, v_cache, meta, local, softcap, native: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(layers, "_decode_library", lambda: None)
        with torch.inference_mode():
            return layers.paged_attention(q, k_cache, v_cache, meta, local, 0.125, softcap)


@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 256), (8, 2, 32), (2, 2, 20), (12, 2, 24)])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 50.0)])
def test_native_decode_attention_is_the_torch_forms_to_fp32_rounding(monkeypatch, hq, hkv, d, window, softcap):
    cached, query_lens = [0, 3, 9, 17, 30], [1, 1, 1, 1, 1]
    k_cache, v_cache, tables = step(cached, query_lens, hkv, d, seed=hq + d)
    meta = build_attention_metadata(query_lens, cached, tables, BLOCK, window)
    q = torch.randn(len(cached), hq, d)
    local = window is not None
    native = attention(q, k_cache, v_cache, meta, local, softcap, True, monkeypatch)
    reference = attention(q, k_cache, v_cache, meta, local, softcap, False, monkeypatch)
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=2e-6)


def test_decode_rows_mixed_with_a_prefill_chunk_keep_their_places(monkeypatch):
    """A step of decode rows around a prefill chunk: the decode group's rows are picked out of the
    flat queries by token index, and the output returns to flat token order."""
    cached, query_lens = [7, 0, 12], [1, 5, 1]
    k_cache, v_cache, tables = step(cached, query_lens, 1, 64, seed=5)
    meta = build_attention_metadata(query_lens, cached, tables, BLOCK, None)
    q = torch.randn(sum(query_lens), 4, 64)
    native = attention(q, k_cache, v_cache, meta, False, None, True, monkeypatch)
    reference = attention(q, k_cache, v_cache, meta, False, None, False, monkeypatch)
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=2e-6)


def test_a_decode_row_is_the_same_bits_alone_in_a_batch_and_on_any_thread_count(monkeypatch):
    cached = [5, 40, 17, 63, 2, 33]
    query_lens = [1] * len(cached)
    k_cache, v_cache, tables = step(cached, query_lens, 2, 128, seed=9, pages=128)
    q = torch.randn(len(cached), 8, 128)
    meta = build_attention_metadata(query_lens, cached, tables, BLOCK, None)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(attention(q, k_cache, v_cache, meta, False, None, True, monkeypatch))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
    for i in (0, 3, 5):
        alone = build_attention_metadata([1], [cached[i]], [tables[i]], BLOCK, None)
        row = attention(q[i:i + 1], k_cache, v_cache, alone, False, None, True, monkeypatch)
        assert torch.equal(row, results[0][i:i + 1])


def test_other_inputs_keep_the_torch_form():
    q, cache = torch.randn(2, 4, 16), torch.randn(8, BLOCK, 2, 16)
    with torch.inference_mode():
        assert layers._native_decode_applies(q, cache, cache)
        assert not layers._native_decode_applies(q, cache.bfloat16(), cache.bfloat16())
        assert not layers._native_decode_applies(q.transpose(1, 2), cache, cache)  # heads not rows of D
        assert not layers._native_decode_applies(q, cache.transpose(1, 2), cache)  # cache not contiguous
    with torch.enable_grad():
        assert not layers._native_decode_applies(q, cache, cache)

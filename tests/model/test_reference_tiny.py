"""Our Gemma 1/2/3 against transformers' own implementations on tiny random-weight checkpoints.

Each checkpoint is saved in Hugging Face layout and loaded through our loader; logits must
match within 1e-4 (fp32) for sequences longer than the sliding window, for a full forward,
for token-by-token decoding over the paged KV cache, for chunked prefill, and for two
sequences of different lengths sharing one step.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.model.attention import allocate_kv_cache, build_attention_metadata, positions_of
from gemma_dist.model.loading import load_model, open_checkpoint
from tests.helpers import VOCAB, forward_chunks, make_tiny_hf_checkpoint

pytest.importorskip("transformers")

CASES = [("gemma1", False), ("gemma2", False), ("gemma3", False), ("gemma3", True)]
SEQ_LEN = 29  # > 3x the sliding window of 8, and not a multiple of the block size
BLOCK = 4
ATOL = 1e-4


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}{'-rope_scaling' if c[1] else ''}")
def pair(request, tmp_path_factory):
    """(reference transformers model, our model loaded from its saved checkpoint)."""
    family, scaling = request.param
    directory = tmp_path_factory.mktemp(family)
    reference = make_tiny_hf_checkpoint(family, directory, rope_scaling=scaling)
    ours = load_model(open_checkpoint(directory), "float32")
    return reference, ours


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def _cache(model, blocks: int = 32):
    c = model.config
    return allocate_kv_cache(c.num_layers, blocks, BLOCK, model.num_kv_heads_per_rank, c.head_dim, torch.float32)


def test_config_read_from_hf(pair):
    reference, ours = pair
    hf = reference.config
    assert ours.config.num_layers == hf.num_hidden_layers
    assert ours.config.num_kv_heads == hf.num_key_value_heads
    if hasattr(hf, "layer_types") and hf.layer_types:
        expected = ["local" if t == "sliding_attention" else "global" for t in hf.layer_types]
        assert [k.value for k in ours.config.layer_kinds] == expected


@pytest.mark.parametrize("chunk", [SEQ_LEN, 1, 5], ids=["full", "token_by_token", "chunks_of_5"])
def test_logits_match_transformers(pair, chunk):
    reference, ours = pair
    ids = _tokens(SEQ_LEN, seed=1)
    table = list(range(8))  # 8 blocks of 4 ≥ 29 positions
    got = forward_chunks(ours, _cache(ours), table, ids, chunk, BLOCK)
    want = _reference_logits(reference, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [SEQ_LEN, 1], ids=["full", "token_by_token"])
def test_fused_cpu_steps_are_bitwise_the_separate_ops(pair, chunk, monkeypatch):
    """On an AVX2 CPU the attention prologue and the residual steps run as fused native calls; the
    logits and every key and value they write are bitwise those of the separate ops."""
    from gemma_dist.model import gemma, layers
    from gemma_dist.model.native import cpu_has_avx2

    if not cpu_has_avx2():
        pytest.skip("the fused kernels need an x86-64 CPU with AVX2 + FMA")
    _, ours = pair
    ids, table = _tokens(SEQ_LEN, seed=3), list(range(8))
    fused_cache, separate_cache = _cache(ours), _cache(ours)
    fused_calls = []

    def counted_prologue(*args):
        fused_calls.append(layers.native_attention_prologue(*args))
        return fused_calls[-1]

    monkeypatch.setattr(gemma, "native_attention_prologue", counted_prologue)
    with torch.inference_mode():
        fused = forward_chunks(ours, fused_cache, table, ids, chunk, BLOCK)
        assert fused_calls and all(q is not None for q in fused_calls)  # every layer took the fused path

        def separate_residual(x, h, post, pre):
            x = x + (h if post is None else post(h))
            return x, pre(x)

        monkeypatch.setattr(gemma, "native_attention_prologue", lambda *args: None)
        monkeypatch.setattr(gemma, "residual_norm", separate_residual)
        separate = forward_chunks(ours, separate_cache, table, ids, chunk, BLOCK)
    assert torch.equal(fused, separate)
    for (k, v), (k_want, v_want) in zip(fused_cache, separate_cache):
        assert torch.equal(k, k_want) and torch.equal(v, v_want)


def test_two_sequences_in_one_step(pair):
    """A decode row and a prefill row in the same step see only their own cache."""
    reference, ours = pair
    a, b = _tokens(SEQ_LEN, seed=2), _tokens(13, seed=3)
    cache = _cache(ours)
    table_a, table_b = list(range(0, 8)), list(range(8, 16))
    # Prefill a[:-1] alone, then one step with a's last token (decode) and all of b (prefill).
    forward_chunks(ours, cache, table_a, a[:-1], SEQ_LEN, BLOCK)
    meta = build_attention_metadata([1, len(b)], [len(a) - 1, 0], [table_a, table_b], BLOCK,
                                    ours.config.sliding_window)
    ids = torch.tensor([a[-1]] + b)
    hidden = ours(ids, positions_of([1, len(b)], [len(a) - 1, 0]), cache, meta)
    logits = ours.compute_logits(hidden)
    torch.testing.assert_close(logits[0], _reference_logits(reference, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], _reference_logits(reference, b), atol=ATOL, rtol=0)


def test_scattered_blocks(pair):
    """Block tables need not be contiguous or ordered."""
    reference, ours = pair
    ids = _tokens(SEQ_LEN, seed=4)
    table = [17, 3, 30, 8, 21, 5, 12, 26]
    got = forward_chunks(ours, _cache(ours), table, ids, 7, BLOCK)
    torch.testing.assert_close(got, _reference_logits(reference, ids), atol=ATOL, rtol=0)


def test_prefill_chunks_of_one_shape_share_an_attention_group(pair):
    """Three 13-token prompts (one attention group), a 9-token one and a decode row in one step:
    the step's tokens in their own order, each sequence against transformers alone."""
    reference, ours = pair
    a = _tokens(SEQ_LEN, seed=5)
    prompts = [_tokens(13, seed=6), _tokens(9, seed=7), _tokens(13, seed=8), _tokens(13, seed=9)]
    cache = _cache(ours, blocks=64)
    tables = [list(range(0, 8))] + [list(range(8 + 4 * i, 12 + 4 * i)) for i in range(len(prompts))]
    forward_chunks(ours, cache, tables[0], a[:-1], SEQ_LEN, BLOCK)
    query_lens = [len(p) for p in prompts] + [1]
    cached = [0] * len(prompts) + [len(a) - 1]
    order = [1, 2, 3, 4, 0]  # prompts first, the decode row last: the groups' outputs are reordered
    meta = build_attention_metadata(query_lens, cached, [tables[i] for i in order], BLOCK, ours.config.sliding_window)
    assert len(meta.groups) == 3  # the decode row, the three 13-token prompts, the 9-token one
    ids = torch.tensor([t for p in prompts for t in p] + [a[-1]])
    logits = ours.compute_logits(ours(ids, positions_of(query_lens, cached), cache, meta))
    start = 0
    for prompt in prompts:
        torch.testing.assert_close(logits[start:start + len(prompt)], _reference_logits(reference, prompt),
                                   atol=ATOL, rtol=0)
        start += len(prompt)
    torch.testing.assert_close(logits[-1], _reference_logits(reference, a)[-1], atol=ATOL, rtol=0)

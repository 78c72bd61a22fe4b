"""Shared test helpers: tiny random-weight Gemma checkpoints in Hugging Face layout, a minimal
forward driver over the paged KV cache, and margin-aware comparisons of greedy tokens."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

VOCAB = 512


def tiny_hf_config(family: str, rope_scaling: bool = False):
    """A transformers config of each family, small enough for millisecond forwards.

    Gemma 1 has one KV head (MQA); Gemma 2 has softcapping and alternating sliding window;
    Gemma 3 has QK-norm, two RoPE bases and (optionally) linear RoPE scaling on global layers.
    """
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if family == "gemma1":
        return transformers.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1,
                                        hidden_activation="gelu_pytorch_tanh", **common)
    if family == "gemma2":
        return transformers.Gemma2Config(num_hidden_layers=4, num_key_value_heads=2, sliding_window=8,
                                         query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, **common)
    if family == "gemma3":
        full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0} if rope_scaling \
            else {"rope_type": "default", "rope_theta": 1_000_000.0}
        return transformers.Gemma3TextConfig(
            num_hidden_layers=7, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=24,
            rope_parameters={"full_attention": full,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            **common)
    raise ValueError(family)


def make_tiny_hf_checkpoint(family: str, directory: Path, rope_scaling: bool = False, seed: int = 0,
                            head_dim_scale: bool = False):
    """Save a random-weight transformers model (with non-trivial norm weights) to `directory`.

    head_dim_scale: query_pre_attn_scalar = head_dim, as GGUF (which has no such key) implies.
    """
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(family, rope_scaling)
    if head_dim_scale and family != "gemma1":
        config.query_pre_attn_scalar = config.head_dim
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def forward_chunks(model, kv_cache, block_table: list[int], token_ids: list[int], chunk: int,
                   block_size: int) -> torch.Tensor:
    """Feed one sequence through `model` `chunk` tokens at a time; logits (len, vocab) for all positions."""
    from gemma_dist.model.attention import build_attention_metadata, positions_of

    outs = []
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        meta = build_attention_metadata([len(piece)], [start], [block_table], block_size,
                                        model.config.sliding_window)
        hidden = model(torch.tensor(piece), positions_of([len(piece)], [start]), kv_cache, meta)
        outs.append(model.compute_logits(hidden))
    return torch.cat(outs)


def shuffled_block_tables(order: list[int], cached: list[int], query_lens: list[int],
                          block_size: int) -> list[list[int]]:
    """Each sequence's block table for its cached + new tokens: consecutive runs of `order` (page ids
    in a shuffled order, so the pages of a table are out of position order in the cache)."""
    tables, used = [], 0
    for c, n in zip(cached, query_lens):
        need = -(-(c + n) // block_size)
        tables.append(order[used: used + need])
        used += need
    return tables


def teacher_forced_logits(model, prompt: list[int], continuation: list[int], block_size: int = 16) -> torch.Tensor:
    """fp32 logits (len(continuation), vocab) of `model` predicting each continuation token, with the
    whole prompt + continuation fed in one forward (teacher forcing: both models see the same tokens)."""
    from gemma_dist.model.attention import allocate_kv_cache

    ids = list(prompt) + list(continuation)
    c, blocks = model.config, -(-len(ids) // block_size)
    cache = allocate_kv_cache(c.num_layers, blocks, block_size, model.num_kv_heads_per_rank, c.head_dim,
                              next(model.parameters()).dtype)
    with torch.inference_mode():
        logits = forward_chunks(model, cache, list(range(blocks)), ids, len(ids), block_size)
    return logits[len(prompt) - 1: len(ids) - 1].float()


def top1_margins(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit of each row: how far the greedy choice is from a tie."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


# --------------------------------------------------------------------------- golden greedy tokens

# The golden file (tests/data/gemma3_270m_greedy.json, scripts/make_reference.py) holds transformers'
# fp32 greedy tokens and, per step, its top-1 margin (top-1 minus top-2 logit). Two correct fp32
# implementations differ in the last bits of every logit (summation order: BLAS kernels, threads,
# batch shapes, tensor-parallel all-reduce), and a step whose margin is smaller than that can pick
# the runner-up on another machine, after which the continuation differs. Measured on the golden
# cases (teacher-forced, 2-core AVX-512 CPU): our fp32 logits vs transformers' differ by at most
# 1.05e-4 (logits of magnitude 26..45), and our top-1 margins vs the recorded ones by at most 1.1e-4;
# our own configurations (batched vs alone, tp=2, other thread counts) differ by less. 0.01 is ~100x
# that: a step with a larger margin gives the same token in every correct fp32 implementation.
GOLDEN_MARGIN = 0.01
MIN_STABLE_TOKENS = 12  # a golden case whose stable prefix is shorter tests too little


def stable_prefix(case: dict, margin: float = GOLDEN_MARGIN) -> list[int]:
    """A golden case's output tokens before its first step whose reference margin is below `margin`
    (the tokens every correct fp32 implementation reproduces on any machine).

    With margin=0.01 the cases keep all 40 tokens except non_english: 12 (its step 12 is a
    near-tie, margin 0.0004)."""
    margins = case["output_margins"]
    assert len(margins) == len(case["output_token_ids"]), case["kind"]
    end = next((i for i, m in enumerate(margins) if m < margin), len(margins))
    return case["output_token_ids"][:end]


def assert_greedy_agrees(got: list[int], want: list[int], want_margins, margin: float = GOLDEN_MARGIN,
                         what: str = "") -> int:
    """`got` (greedy tokens of one run) equals `want` (greedy tokens of a reference run, whose top-1
    margin at each step is `want_margins`) up to the reference's first near-tie (margin < `margin`);
    past a near-tie either token is right and the continuations may part. Both must have the same
    length unless they parted. Returns how many tokens were compared (callers assert it is enough)."""
    assert len(want_margins) >= len(want), what
    end = next((i for i, m in enumerate(want_margins[:len(want)]) if m < margin), len(want))
    assert got[:end] == want[:end], f"{what}: differ before the reference's first near-tie (step {end})"
    if end == len(want):
        assert len(got) == len(want), what
    return end


def default_tokenizer():
    """The real Gemma tokenizer of the default checkpoint (no model loaded)."""
    from gemma_dist.model.loading import open_checkpoint

    checkpoint = open_checkpoint("default")
    try:
        return checkpoint.load_tokenizer()
    finally:
        checkpoint.source.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (servers under test bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_beams(got_tokens: list[list[int]], got_scores: list[float], want_tokens: list[list[int]],
                      want_scores: list[float], margin: float = 1e-3, abs_score: float = 1e-4) -> None:
    """Beam-search results (best first) agree with a reference: every score within `abs_score`, and
    each beam's tokens wherever the reference's neighbouring scores are more than `margin` apart
    (beams at a near-tie may come out in either order on another machine's kernels)."""
    import pytest

    assert len(got_tokens) == len(want_tokens)
    assert got_scores == pytest.approx(want_scores, abs=abs_score)
    for i, (got, want) in enumerate(zip(got_tokens, want_tokens)):
        neighbours = [want_scores[j] for j in (i - 1, i + 1) if 0 <= j < len(want_scores)]
        if all(abs(want_scores[i] - s) > margin for s in neighbours):
            assert got == want, f"beam {i}"

"""A sequence's logits do not depend on what shares its step (bitwise), on the real Gemma 3 270M.

Decode rows are batched together and every prefill chunk runs alone (attention groups), GEMM
inputs of 2..11 rows are padded to kernel-stable sizes, and GEMM outputs are made contiguous,
so rows agree bit for bit whenever a step holds two or more tokens. One-row products (a lone
decoding sequence, or the LM head of a step with one sequence) use the fast matrix-vector kernel
unless batch-invariant mode is on; these tests run in that mode.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.engine.model_runner import ModelRunner, StepInput
from gemma_dist.model import layers
from gemma_dist.model.layers import linear, lm_head


@pytest.fixture(autouse=True, scope="module")
def batch_invariant_mode():
    layers.set_batch_invariant(True)
    yield
    layers.set_batch_invariant(False)


@pytest.mark.parametrize("shape", [(1536, 640), (640, 2048), (262144, 640)], ids=str)
def test_gemm_rows_do_not_depend_on_batch_size(shape):
    torch.manual_seed(0)
    weight, x = torch.randn(*shape), torch.randn(200, shape[1])
    fn = lm_head if shape[0] > 100_000 else linear
    with torch.inference_mode():
        full = fn(x, weight)
        for rows in list(range(1, 40)) + [100, 199]:
            assert torch.equal(fn(x[:rows], weight), full[:rows]), rows


@pytest.fixture(scope="module")
def runner(default_llm):
    r = ModelRunner(default_llm.model, num_blocks=160, block_size=16)
    g = torch.Generator().manual_seed(0)
    seqs = {name: (torch.randint(10, 5000, (n,), generator=g).tolist(), list(range(start, start + blocks)))
            for name, n, start, blocks in [("a", 40, 0, 8), ("b", 600, 8, 40), ("c", 90, 48, 8),
                                           ("d", 77, 60, 6), ("e", 33, 70, 3)]}
    for name in "abc":  # cache everything but the last token of a, b, c
        ids, table = seqs[name]
        r.logits([StepInput(ids[:-1], 0, table, None)])
    return r, seqs


def _decode(seqs, name):
    ids, table = seqs[name]
    return StepInput(ids[-1:], len(ids) - 1, table, None)


def _prefill(seqs, name):
    ids, table = seqs[name]
    return StepInput(ids, 0, table, None)


def test_decode_rows_are_identical_in_any_batch(runner):
    r, seqs = runner
    pair = r.logits([_decode(seqs, "a"), _decode(seqs, "c")])
    for steps, row_a in [([_decode(seqs, "c"), _decode(seqs, "a")], 1),
                         ([_decode(seqs, "a"), _decode(seqs, "b"), _decode(seqs, "c")], 0),
                         ([_decode(seqs, "b"), _decode(seqs, "a")], 1)]:
        assert torch.equal(r.logits(steps)[row_a], pair[0])


def test_decode_row_unchanged_by_a_prefill_in_the_same_step(runner):
    r, seqs = runner
    reference = r.logits([_decode(seqs, "a"), _decode(seqs, "c")])
    mixed = r.logits([_decode(seqs, "a"), _prefill(seqs, "d"), _decode(seqs, "c")])
    assert torch.equal(mixed[0], reference[0]) and torch.equal(mixed[2], reference[1])


def test_prefill_unchanged_by_decodes_in_the_same_step(runner):
    r, seqs = runner
    alone = r.logits([_prefill(seqs, "e")])
    batched = r.logits([_decode(seqs, "c"), _prefill(seqs, "e"), _decode(seqs, "a")])
    assert torch.equal(batched[1], alone[0])


def test_fast_mode_differs_only_for_one_row():
    torch.manual_seed(0)
    weight, x = torch.randn(1536, 640), torch.randn(64, 640)
    layers.set_batch_invariant(False)
    try:
        with torch.inference_mode():
            full = linear(x, weight)
            for rows in range(2, 40):
                assert torch.equal(linear(x[:rows], weight), full[:rows]), rows
            assert torch.allclose(linear(x[:1], weight), full[:1], atol=1e-4, rtol=0)
    finally:
        layers.set_batch_invariant(True)

"""The greedy LM head (layers.lm_head_argmax) and the runner's argmax rows.

Greedy rows without logprobs, penalties or constraints need only each row's best logit; on CPU the
LM head then runs in vocabulary chunks and never builds the (rows, vocab) logits. Its values must
be the whole product's (the same GEMM form, chunk by chunk), its ids the whole row's argmax (the
first index on ties), and the runner must give such rows the tokens the sampler gives them over
full logits while rows that need logits still get them.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.engine.model_runner import ModelRunner, StepInput, argmax_rows, merge_results
from gemma_dist.model import layers
from gemma_dist.model.layers import _soft_capped, lm_head, lm_head_argmax
from gemma_dist.sampling import SampleResult, SamplingParams, SamplingRow, TokenLogprob
from tests.helpers import top1_margins


def whole_row_argmax(x: torch.Tensor, w: torch.Tensor, limit: int, softcap: float | None):
    """The reference: the whole (M, V) product, softcapped, its argmax below `limit`."""
    with torch.inference_mode():
        logits = _soft_capped(lm_head(x, w).float(), softcap)[:, :limit]
    ids = logits.argmax(dim=-1)
    return logits.gather(1, ids[:, None]).squeeze(1), ids


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("vocab", [3 * layers._ARGMAX_CHUNK + 100, 2 * layers._ARGMAX_CHUNK])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_greedy_head_equals_the_whole_rows_argmax(rows, vocab, softcap):
    torch.manual_seed(rows + vocab)
    w, x = torch.randn(vocab, 32), torch.randn(rows, 32)
    for limit in (vocab, vocab - 777, layers._ARGMAX_CHUNK - 5, 1000):
        with torch.inference_mode():
            values, ids = lm_head_argmax(x, w, limit, softcap)
        want_values, want_ids = whole_row_argmax(x, w, limit, softcap)
        assert torch.equal(ids, want_ids), limit
        # The same fp32 products; a few ulp of slack for a BLAS that blocks another chunk width differently.
        torch.testing.assert_close(values, want_values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [8, 32])
def test_ties_resolve_to_the_first_index_inside_a_block_across_blocks_and_across_chunks(rows):
    chunk, block = layers._ARGMAX_CHUNK, layers._ARGMAX_BLOCK
    x = torch.ones(rows, 4)
    for tied in ([5, block + 3, chunk + 1], [block + 7, block + 9], [3 * block + 1, 2 * block + 2],
                 [chunk + 2, 2 * chunk + 1], [2 * chunk + 5, chunk + 9]):
        w = torch.zeros(3 * chunk, 4)
        w[tied] = 1.0
        with torch.inference_mode():
            values, ids = lm_head_argmax(x, w, 3 * chunk)
        assert ids.tolist() == [min(tied)] * rows and values.tolist() == [4.0] * rows


def test_a_limit_at_or_below_zero_has_no_candidate():
    values, ids = lm_head_argmax(torch.ones(6, 4), torch.ones(100, 4), 0)
    assert ids.tolist() == [0] * 6 and torch.isinf(values).all() and (values < 0).all()


@pytest.mark.parametrize("rows", [8, 64])  # both product forms: (x @ W^T) below 16 rows, (W @ x^T) from 16
def test_the_chunked_head_never_builds_the_whole_logits(monkeypatch, rows):
    """Every GEMM it runs yields at most one chunk of logits: the (rows, vocab) logits never exist."""
    sizes = []
    mm = torch.mm

    def recording_mm(a, b, **kwargs):
        sizes.append(a.shape[0] * b.shape[1])
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    vocab = 4 * layers._ARGMAX_CHUNK
    with torch.inference_mode():
        lm_head_argmax(torch.randn(rows, 16), torch.randn(vocab, 16), vocab)
    assert len(sizes) == 4 and max(sizes) == layers._ARGMAX_CHUNK * rows


def test_batch_invariant_mode_keeps_its_fixed_tiles():
    torch.manual_seed(1)
    w, x = torch.randn(3 * layers._ARGMAX_CHUNK, 16), torch.randn(40, 16)
    layers.set_batch_invariant(True)
    try:
        with torch.inference_mode():
            values, ids = lm_head_argmax(x, w, w.shape[0])
            alone = [lm_head_argmax(x[i:i + 1], w, w.shape[0]) for i in range(0, 40, 13)]
    finally:
        layers.set_batch_invariant(False)
    for j, i in enumerate(range(0, 40, 13)):
        assert torch.equal(alone[j][0], values[i:i + 1]) and torch.equal(alone[j][1], ids[i:i + 1])


def test_argmax_rows_are_the_plain_greedy_ones():
    rows = [SamplingRow(SamplingParams(temperature=0), [1], []),
            SamplingRow(SamplingParams(temperature=0, logprobs=2), [1], []),
            SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.3), [1], []),
            SamplingRow(SamplingParams(temperature=0.7), [1], []),
            SamplingRow(SamplingParams(temperature=0, regex="[ab]+"), [1], []),
            SamplingRow(SamplingParams(temperature=0, max_tokens=3), [1], [])]
    assert argmax_rows(rows) == ([0, 5], [1, 2, 3, 4])
    merged = merge_results(3, [0, 2], [7, 9], [1], SampleResult([4], [TokenLogprob(4, -0.5)]))
    assert merged.token_ids == [7, 4, 9] and merged.logprobs[0] is None and merged.logprobs[1].logprob == -0.5


def test_the_runner_gives_argmax_rows_the_samplers_tokens_and_others_their_logits(tiny_model):
    """One step mixing plain greedy rows with logprob, penalized and sampled rows: the greedy rows'
    tokens are the full logits' argmax, the logprob rows report logprobs, every row gets a token."""
    runner = ModelRunner(tiny_model, num_blocks=64, block_size=16)
    torch.manual_seed(0)
    vocab = tiny_model.config.vocab_size
    prompts = [torch.randint(3, vocab, (5 + i,)).tolist() for i in range(8)]
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=3),
             SamplingParams(temperature=0, repetition_penalty=1.5), SamplingParams(temperature=0.8, seed=3)] * 2
    steps, start = [], 0
    for prompt, params in zip(prompts, kinds):
        blocks = list(range(start, start + 1))
        start += 1
        steps.append(StepInput(prompt, 0, blocks, SamplingRow(params, prompt, [])))
    logits = runner.logits(steps)  # (8, vocab): the same forward, whole rows (writes the same K/V)
    result = runner.execute(steps)
    argmax = logits.argmax(dim=-1).tolist()
    clear = top1_margins(logits) > 1e-4
    for i, params in enumerate(kinds):
        if params.argmax_only and clear[i]:
            assert result.token_ids[i] == argmax[i]
        if params.logprobs:
            assert result.logprobs[i] is not None and len(result.logprobs[i].top) == 3
            if clear[i]:
                assert result.token_ids[i] == argmax[i] == result.logprobs[i].top[0][0]
        else:
            assert result.logprobs[i] is None
        assert 0 <= result.token_ids[i] < vocab
    assert int(clear[[0, 4]].sum()) >= 1  # the comparison of argmax rows means something


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gemma_dist.model.loading import load_model, open_checkpoint
    from tests.helpers import make_tiny_hf_checkpoint

    path = tmp_path_factory.mktemp("tiny-greedy-head")
    make_tiny_hf_checkpoint("gemma2", path)  # Gemma 2: the final logit softcap applies
    return load_model(open_checkpoint(str(path)), "float32")

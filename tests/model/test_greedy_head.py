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
from gemma_dist.model.layers import PackedArgmax, _soft_capped, lm_head, lm_head_argmax
from gemma_dist.model.native import cpu_has_avx2
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
    # A narrow fp32 head: its greedy rows go through the native kernel where it builds.
    assert (runner.model.embed.argmax_kernel is not None) == cpu_has_avx2()
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


# --------------------------------------------------------------------------- the native greedy head

needs_avx2 = pytest.mark.skipif(not cpu_has_avx2(), reason="the native greedy head needs an x86-64 CPU with AVX2 + FMA")


def packed(w: torch.Tensor) -> PackedArgmax:
    kernel = PackedArgmax.of(w)
    assert kernel is not None  # AVX2 is here (needs_avx2): the kernel must build
    return kernel


@needs_avx2
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 64, 301])
@pytest.mark.parametrize("vocab", [16, 40_007, 3 * layers._ARGMAX_CHUNK])
def test_native_greedy_head_picks_the_whole_rows_argmax(rows, vocab):
    """Ids: the whole product's argmax wherever its top-1 margin clears fp32 rounding (a K-ordered
    sum and the BLAS's differ in the last bits); values: the same products within a few ulp."""
    torch.manual_seed(rows * 7 + vocab)
    w, x = torch.randn(vocab, 64), torch.randn(rows, 64)
    kernel = packed(w)
    for limit in sorted({vocab, vocab - 5, max(1, vocab // 3 + 1), 1}):
        with torch.inference_mode():
            values, ids = lm_head_argmax(x, w, limit, argmax_kernel=kernel)
            logits = lm_head(x, w)[:, :limit]
        want_values, want_ids = whole_row_argmax(x, w, limit, None)
        clear = top1_margins(logits) > 1e-4 if limit > 1 else torch.ones(rows, dtype=torch.bool)
        assert clear.float().mean() > 0.9  # the check below has rows to hold
        assert torch.equal(ids[clear], want_ids[clear]), limit
        torch.testing.assert_close(values, logits.gather(1, ids[:, None]).squeeze(1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(values, want_values, rtol=1e-6, atol=1e-5)


@needs_avx2
def test_native_greedy_head_breaks_ties_to_the_lowest_id_within_and_across_panels_and_threads():
    rows, vocab = 9, 4096
    x = torch.ones(rows, 8)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            # The threads take id ranges in any order (on 2 threads 16 ranges of 256 ids): ties across them too.
            for tied in ([3, 9], [17, 40], [vocab - 1, vocab // 2 + 1], [vocab // 2 - 3, vocab // 2 + 5, 7],
                         [255, 256], [9 * 256 + 4, 5 * 256 + 1, 12 * 256]):
                w = torch.zeros(vocab, 8)
                w[tied] = 1.0
                with torch.inference_mode():
                    values, ids = lm_head_argmax(x, w, vocab, argmax_kernel=packed(w))
                assert ids.tolist() == [min(tied)] * rows and values.tolist() == [8.0] * rows, (threads, tied)
    finally:
        torch.set_num_threads(previous)


@needs_avx2
def test_native_greedy_head_is_batch_and_thread_invariant():
    """Each logit is one fixed K-ordered sum: a row's (value, id) are the same bits alone or among
    300 rows, on 1 or 2 threads."""
    torch.manual_seed(3)
    w, x = torch.randn(20_000, 48), torch.randn(300, 48)
    kernel = packed(w)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                results.append(kernel.best(x, 20_000))
        alone = [kernel.best(x[i:i + 1], 20_000) for i in (0, 5, 6, 299)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for j, i in enumerate((0, 5, 6, 299)):
        assert torch.equal(alone[j][0], results[0][0][i:i + 1]) and torch.equal(alone[j][1], results[0][1][i:i + 1])


@needs_avx2
def test_native_greedy_head_never_picks_nan_and_defaults_to_minus_inf_at_id_zero():
    w = torch.zeros(64, 4)
    w[10] = float("nan")
    w[20] = 1.0
    values, ids = packed(w).best(torch.ones(3, 4), 64)
    assert ids.tolist() == [20] * 3 and values.tolist() == [4.0] * 3
    w = torch.full((64, 4), float("-inf"))
    values, ids = packed(w).best(torch.ones(2, 4), 64)
    assert ids.tolist() == [0, 0] and torch.isinf(values).all() and (values < 0).all()


@needs_avx2
def test_narrow_fp32_heads_get_the_native_greedy_head_and_lose_it_when_their_weight_changes():
    from gemma_dist.model.layers import ParallelContext, VocabParallelEmbedding, set_cpu_kernels

    narrow, wide = (VocabParallelEmbedding(1000, width, ParallelContext()) for width in (64, 256))
    model = torch.nn.ModuleList([narrow, wide])
    for module in model:
        torch.nn.init.normal_(module.weight)
    set_cpu_kernels(model)
    assert isinstance(narrow.argmax_kernel, PackedArgmax) and wide.argmax_kernel is None
    kernel = narrow.argmax_kernel
    set_cpu_kernels(model)
    assert narrow.argmax_kernel is kernel  # current: kept
    x = torch.randn(8, 64)
    with torch.inference_mode():
        assert kernel.applies(x)
        narrow.weight.mul_(2.0)
        assert not kernel.applies(x)  # stale, never wrong: the torch head serves
        values, ids = narrow.argmax(x, 1000, None)
    torch.testing.assert_close(values, (x @ narrow.weight.t()).amax(1), rtol=1e-6, atol=1e-5)
    set_cpu_kernels(model, quantize="int8")
    assert narrow.argmax_kernel is None  # int8's own head
    set_cpu_kernels(model, prepack=False)
    assert narrow.argmax_kernel is None  # plain weights: the torch head


@needs_avx2
def test_native_rows_argmax_over_written_logits_is_torchs_argmax_with_nan_never_picked():
    """The int8 LM head writes its logits; their greedy pick is the native row argmax."""
    torch.manual_seed(4)
    for shape in ((1, 262_144), (3, 1000), (2, 7)):
        logits = torch.randn(*shape)
        values, ids = layers._native_rows_argmax(logits)
        assert torch.equal(ids, logits.argmax(-1)) and torch.equal(values, logits.amax(-1))
    strided = torch.randn(4, 300)[:, :257]  # a limit below the vocabulary: rows of stride 300
    values, ids = layers._native_rows_argmax(strided)
    assert torch.equal(ids, strided.argmax(-1))
    logits = torch.zeros(2, 20)
    logits[0, 3], logits[0, 5], logits[0, 9] = float("nan"), 1.0, 1.0
    logits[1] = float("-inf")
    values, ids = layers._native_rows_argmax(logits)
    assert ids.tolist() == [5, 0] and values[0] == 1.0 and values[1] == float("-inf")

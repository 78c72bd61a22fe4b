"""Unit tests for gemma_dist.sampling: parameter validation, filters, seeds, penalties, logprobs."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch

from gemma_dist.sampling import (
    Sampler,
    SamplingParams,
    SamplingParamsError,
    SamplingRow,
    apply_penalties,
    blockwise_argmax,
    blockwise_topk,
    make_generator,
)

GEMMA_VOCAB = 262_144


def row(params: SamplingParams, prompt=(), output=(), generator=None) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), generator)


def draw_many(
    logits_row: torch.Tensor, params: SamplingParams, draws: int = 2000, seed: int = 0
) -> Counter:
    """Sample `draws` times from one logits row (as a batch of identical rows)."""
    logits = logits_row.expand(draws, -1).contiguous()
    result = Sampler(seed=seed)(logits, [row(params)] * draws)
    return Counter(result.token_ids)


def logits_from_probs(
    probs: list[float], vocab_size: int | None = None, filler: float = -30.0
) -> torch.Tensor:
    """A logits row whose softmax over the first len(probs) tokens is `probs`; the rest ~0."""
    vocab_size = vocab_size or len(probs)
    logits = torch.full((vocab_size,), filler)
    logits[: len(probs)] = torch.tensor(probs).log()
    return logits


# ------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", True),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", [f"s{i}" for i in range(17)]),
        ("stop", [""]),
        ("stop", ["x" * 257]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [True]),
        ("seed", -1),
        ("seed", 2**64),
        ("ignore_eos", 1),
    ],
)
def test_invalid_params_raise_error_naming_the_parameter(name, value):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**{name: value})
    assert str(error.value).startswith(name), str(error.value)
    assert isinstance(error.value, ValueError)


def test_top_p_message_reads_well():
    with pytest.raises(SamplingParamsError, match=r"^top_p must be in \(0, 1\], got 1\.5$"):
        SamplingParams(top_p=1.5)


def test_defaults_are_gemma_recommended():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
        1.0,
        0.95,
        64,
        256,
    )
    assert params.min_p == 0 and params.seed is None and params.logprobs == 0
    assert not params.is_greedy and not params.has_penalties


def test_params_normalize_and_stay_hashable():
    params = SamplingParams(temperature=0, stop="END", stop_token_ids=[1, 106], seed=2**64 - 1)
    assert params.is_greedy and isinstance(params.temperature, float)
    assert params.stop == ("END",) and params.stop_token_ids == (1, 106)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=["x" * 256] * 16).stop[0] == "x" * 256  # the limits themselves pass
    hash(params)
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # frozen


# ------------------------------------------------------------------------------------------------
# Filters: never outside the allowed set, and every allowed token shows up


PROBS = [0.4, 0.3, 0.2, 0.05, 0.05]


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=3, top_p=1.0), {0, 1, 2}),
        (SamplingParams(top_k=0, top_p=0.65), {0, 1}),  # 0.4 < 0.65 <= 0.7
        (SamplingParams(top_k=0, top_p=0.75), {0, 1, 2}),  # 0.7 < 0.75 <= 0.9
        (SamplingParams(top_k=0, top_p=0.01), {0}),  # the best token always survives
        # top-p runs on the top-k distribution: 0.4/0.95 + 0.3/0.95 = 0.737 >= 0.72 cuts token 2
        (SamplingParams(top_k=4, top_p=0.72), {0, 1}),
        (SamplingParams(top_k=0, top_p=1.0, min_p=0.6), {0, 1}),  # p >= 0.24
        (SamplingParams(top_k=0, top_p=1.0, min_p=0.45), {0, 1, 2}),  # p >= 0.18
        (SamplingParams(top_k=0, top_p=1.0), {0, 1, 2, 3, 4}),
    ],
)
def test_filters_pick_exactly_the_allowed_tokens(params, allowed):
    picked = draw_many(logits_from_probs(PROBS, vocab_size=5), params)
    assert set(picked) == allowed


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=10, top_p=1.0, min_p=0.45), {0, 1, 2}),  # top-k path + min-p
        (SamplingParams(top_k=10, top_p=0.75), {0, 1, 2}),  # top-k path + top-p
        (SamplingParams(top_k=2, top_p=1.0, min_p=0.0), {0, 1}),
        (SamplingParams(top_k=0, top_p=0.75), {0, 1, 2}),  # nucleus found among the candidates
    ],
)
def test_filters_with_a_larger_vocabulary(params, allowed):
    # 4096 tokens: the blockwise top-k path is used; the tail is ~e^-30 relative to the head.
    picked = draw_many(logits_from_probs(PROBS, vocab_size=4096), params)
    assert set(picked) == allowed


def test_nucleus_larger_than_the_candidates_falls_back_to_a_full_sort():
    vocab_size, top_p = 4096, 0.9
    logits = (
        torch.randn(vocab_size, generator=torch.Generator().manual_seed(1)) * 0.1
    )  # nearly flat
    # Reference nucleus in fp64, with a little slack at the boundary for fp32 rounding.
    probs, order = torch.softmax(logits.double(), dim=-1).sort(descending=True)
    mass_before = probs.cumsum(0) - probs
    allowed = set(order[mass_before < top_p + 1e-4].tolist())
    assert len(allowed) > 2000  # far more than NUCLEUS_CANDIDATES
    picked = draw_many(logits, SamplingParams(top_k=0, top_p=top_p), draws=2000)
    assert set(picked) <= allowed
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(vocab_size)
    assert max(rank_of[list(picked)].tolist()) > 2000  # tokens deep in the nucleus get sampled


def test_masked_tokens_are_never_sampled():
    logits = torch.zeros(64)
    logits[::2] = -math.inf
    for params in (SamplingParams(top_k=0, top_p=1.0), SamplingParams(top_k=50, top_p=1.0)):
        assert all(token % 2 == 1 for token in draw_many(logits, params))


# ------------------------------------------------------------------------------------------------
# Greedy and temperature


def test_temperature_zero_is_argmax_and_tiny_temperature_matches_it():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    sampler = Sampler(seed=0)
    greedy = sampler(logits, [row(SamplingParams(temperature=0))] * 64).token_ids
    assert greedy == logits.argmax(-1).tolist()
    for params in (
        SamplingParams(temperature=1e-4),
        SamplingParams(temperature=1e-4, top_k=0, top_p=1.0),
        SamplingParams(temperature=1e-4, top_k=0, top_p=0.99),
        SamplingParams(temperature=1e-30, top_k=0, top_p=1.0),  # no overflow to nan
    ):
        assert sampler(logits, [row(params)] * 64).token_ids == greedy


def test_greedy_uses_penalized_logits():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(logits, [row(params, prompt=[0])]).token_ids == [1]  # 3 / 2 < 2


def test_empirical_distribution_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    draws = 20_000
    for temperature in (1.0, 0.7):
        params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0)
        counts = draw_many(logits, params, draws=draws, seed=123)
        expected = torch.softmax(logits / temperature, dim=-1) * draws
        chi_square = sum(
            (counts[i] - expected[i].item()) ** 2 / expected[i].item() for i in range(8)
        )
        assert chi_square < 24.3, chi_square  # 7 degrees of freedom, p = 0.001


# ------------------------------------------------------------------------------------------------
# Seeds


SEEDED_VARIANTS = [
    SamplingParams(seed=1234),  # top_k 64, top_p 0.95
    SamplingParams(seed=1234, top_k=0, top_p=1.0),  # full vocabulary
    SamplingParams(seed=1234, top_k=0, top_p=0.9, min_p=0.05),  # nucleus
    SamplingParams(seed=1234, top_k=64, repetition_penalty=1.3, frequency_penalty=0.5),
]


@pytest.mark.parametrize(
    "target, vocab_size, steps",
    [(params, 4096, 6) for params in SEEDED_VARIANTS]
    # At Gemma's vocabulary, full-vocabulary reductions take other code paths in torch.
    + [(SEEDED_VARIANTS[1], GEMMA_VOCAB, 2), (SEEDED_VARIANTS[2], GEMMA_VOCAB, 2)],
)
def test_seed_reproduces_across_batch_compositions_and_positions(target, vocab_size, steps):
    step_logits = torch.randn(steps, 6, vocab_size, generator=torch.Generator().manual_seed(7)) * 2

    def run(batch_size: int, position: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(seed=sampler_seed)
        target_generator = make_generator(target.seed)
        other_generators = [make_generator(99), make_generator(5)]
        others = [
            SamplingParams(seed=99, top_k=10),
            SamplingParams(top_k=0, top_p=0.8),  # unseeded, shares the sampler's generator
            SamplingParams(temperature=0),
            SamplingParams(seed=5, top_k=64, repetition_penalty=1.2),
        ]
        tokens = []
        for step in range(steps):
            rows, logits = [], []
            for slot in range(batch_size):
                if slot == position:
                    rows.append(
                        row(target, prompt=[1, 2], output=tokens, generator=target_generator)
                    )
                    logits.append(step_logits[step, 0])
                else:
                    other = others[slot % len(others)]
                    generator = other_generators[slot % 2] if other.seed is not None else None
                    rows.append(row(other, prompt=[3], output=[4, 4], generator=generator))
                    logits.append(step_logits[step, 1 + slot % 5])
            tokens.append(sampler(torch.stack(logits), rows).token_ids[position])
        return tokens

    alone = run(batch_size=1, position=0, sampler_seed=1)
    assert run(batch_size=5, position=3, sampler_seed=2) == alone
    assert run(batch_size=5, position=0, sampler_seed=3) == alone
    assert len(set(alone)) > 1


def test_different_seeds_differ_and_unseeded_sampler_seed_reproduces():
    logits = torch.zeros(1, 4096)  # uniform: every draw is informative
    params = SamplingParams(top_k=0, top_p=1.0)

    def sequence(generator, sampler_seed=0):
        sampler = Sampler(seed=sampler_seed)
        return [sampler(logits, [row(params, generator=generator)]).token_ids[0] for _ in range(5)]

    assert sequence(make_generator(1)) == sequence(make_generator(1))
    assert sequence(make_generator(1)) != sequence(make_generator(2))
    assert sequence(None, sampler_seed=8) == sequence(None, sampler_seed=8)


# ------------------------------------------------------------------------------------------------
# Penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    penalized = apply_penalties(logits, [row(params, prompt=[0, 1], output=[3, 3, 3, 1])])
    # token 0 (prompt only): 2 / 2; token 1 (both, negative): -1 * 2; token 3 (3x): once, 3 / 2
    assert penalized.tolist() == [[1.0, -2.0, 0.5, 1.5, -2.0, 1.0]]


def test_frequency_and_presence_penalties_use_output_counts_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    penalized = apply_penalties(logits, [row(params, prompt=[0, 2], output=[3, 3, 3, 1, 2])])
    # token 3: 3 - (0.5 * 3 + 0.25); token 1: -1 - 0.75; token 2: 0.5 - 0.75; token 0: prompt only
    assert penalized.tolist() == [[2.0, -1.75, -0.25, 1.25, -2.0, 1.0]]


def test_penalties_apply_in_order_per_row_and_leave_the_input_alone():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]] * 3)
    before = logits.clone()
    rows = [
        row(
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            prompt=[0, 1],
            output=[3, 3, 3, 1],
        ),
        row(SamplingParams(), prompt=[0, 1], output=[3]),  # no penalties: untouched
        row(SamplingParams(presence_penalty=-1.0), prompt=[5], output=[4, 4]),  # negative = boost
    ]
    penalized = apply_penalties(logits, rows)
    assert torch.equal(logits, before)
    # row 0: repetition first (1, -2, 1.5), then token 3 -= 1.75 and token 1 -= 0.75
    assert penalized[0].tolist() == [1.0, -2.75, 0.5, -0.25, -2.0, 1.0]
    assert penalized[1].tolist() == before[1].tolist()
    assert penalized[2].tolist() == [2.0, -1.0, 0.5, 3.0, -1.0, 1.0]


def test_no_penalties_returns_the_same_tensor_and_bad_ids_are_rejected():
    logits = torch.zeros(2, 8)
    assert apply_penalties(logits, [row(SamplingParams())] * 2) is logits
    with pytest.raises(ValueError, match="token ids"):
        apply_penalties(logits[:1], [row(SamplingParams(repetition_penalty=1.1), output=[8])])


def test_sampler_never_modifies_the_callers_logits():
    logits = torch.randn(4, 4096)
    before = logits.clone()
    rows = [
        row(SamplingParams(repetition_penalty=1.5, logprobs=2), prompt=[1], output=[2, 2]),
        row(SamplingParams(temperature=0, frequency_penalty=1.0), output=[int(logits[1].argmax())]),
        row(SamplingParams(top_k=0, top_p=0.5, presence_penalty=2.0), output=[3]),
        row(SamplingParams(top_k=0, top_p=1.0, temperature=0.5)),
    ]
    Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_report_raw_log_softmax_of_the_chosen_token_and_sorted_top_n():
    logits = torch.randn(4, 4096, generator=torch.Generator().manual_seed(3))
    rows = [
        row(SamplingParams(logprobs=5, repetition_penalty=1.8), prompt=[7], output=[9]),
        row(SamplingParams(logprobs=0)),
        row(SamplingParams(temperature=0, logprobs=20)),
        row(SamplingParams(logprobs=1, top_k=0, top_p=1.0)),
    ]
    result = Sampler(seed=0)(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)  # raw logits: penalties do not show up here
    assert result.logprobs[1] is None
    for i, n in ((0, 5), (2, 20), (3, 1)):
        entry = result.logprobs[i]
        assert entry.token_id == result.token_ids[i]
        assert entry.logprob == pytest.approx(reference[i, entry.token_id].item(), abs=1e-5)
        assert len(entry.top) == n
        top_values = [value for _, value in entry.top]
        assert top_values == sorted(top_values, reverse=True)
        expected = reference[i].topk(n)
        assert [token for token, _ in entry.top] == expected.indices.tolist()
        assert top_values == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert result.logprobs[2].top[0][0] == result.token_ids[2]  # greedy: the chosen token is best


def test_logprobs_with_fewer_tokens_than_requested():
    result = Sampler(seed=0)(torch.tensor([[0.0, 1.0, 2.0]]), [row(SamplingParams(logprobs=5))])
    assert len(result.logprobs[0].top) == 3


# ------------------------------------------------------------------------------------------------
# Shapes, blockwise kernels, speed


def test_bad_shapes_and_empty_batches():
    sampler = Sampler()
    with pytest.raises(ValueError, match="logits must be"):
        sampler(torch.zeros(2, 8), [row(SamplingParams())])
    assert sampler(torch.zeros(0, 8), []).token_ids == []
    bf16 = torch.randn(2, 16).bfloat16()
    assert (
        sampler(bf16, [row(SamplingParams(temperature=0))] * 2).token_ids
        == bf16.float().argmax(-1).tolist()
    )


def test_blockwise_kernels_match_torch_at_gemma_vocab():
    logits = torch.randn(3, GEMMA_VOCAB, generator=torch.Generator().manual_seed(0))
    logits[1, 5000] = logits[1, 200_000] = 100.0  # tie across blocks: argmax keeps the first
    logits[2, 7] = logits[2, 8] = 50.0  # tie within a block
    assert torch.equal(blockwise_argmax(logits), logits.argmax(-1))
    for k in (1, 20, 64, 1024):
        values, ids = blockwise_topk(logits, k)
        assert torch.equal(values, logits.topk(k, dim=-1).values)
        assert torch.equal(logits.gather(1, ids), values)


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm up (scratch buffers, kernels)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_full_vocab_batch_is_fast():
    """Sampling a batch at Gemma's vocabulary costs a few passes over the logits, measured against
    one pass (a softmax of the same batch) timed in the same run, not against a wall-clock bound
    that only holds on one machine. A full-vocabulary sort, the cost this guards against, takes ~30x
    a softmax; the sampler took ~1.3x (default top-k/top-p) and ~0.1x (greedy)."""
    logits = torch.randn(32, GEMMA_VOCAB)
    sampler = Sampler(seed=0)
    one_pass = _best_seconds(lambda: torch.softmax(logits, dim=-1))
    for params in (SamplingParams(), SamplingParams(temperature=0)):
        rows = [row(params, prompt=[1, 2, 3], output=[4])] * 32
        token_ids = sampler(logits, rows).token_ids
        assert len(token_ids) == 32 and all(0 <= t < GEMMA_VOCAB for t in token_ids)
        elapsed = _best_seconds(lambda: sampler(logits, rows))
        assert elapsed < 8 * one_pass, f"{params}: {elapsed * 1e3:.1f} ms, softmax {one_pass * 1e3:.1f} ms"

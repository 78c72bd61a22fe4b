"""BeamSearch, the plain-Python rule (no model): against exhaustive search and greedy decoding on a
toy next-token distribution, and the end-token, length-penalty and early-stopping rules."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gemma_dist.beam_search import Beam, BeamSearch, end_ids, step_params, token_logprobs
from gemma_dist.sampling import SamplingParams

VOCAB = 4


def toy_logprobs(prefix: tuple[int, ...], seed: int = 0) -> list[float]:
    """A fixed next-token distribution over VOCAB tokens for each prefix (log-probabilities)."""
    rng = random.Random(hash((seed, prefix)))
    weights = [rng.random() + 0.05 for _ in range(VOCAB)]
    total = sum(weights)
    return [math.log(w / total) for w in weights]


def candidates(prefix: tuple[int, ...], seed: int = 0) -> list[tuple[int, float]]:
    """The toy model's tokens best first, as a driver hands them to `advance`."""
    return sorted(enumerate(toy_logprobs(prefix, seed)), key=lambda c: -c[1])


def run(search: BeamSearch, seed: int = 0) -> list[Beam]:
    while not search.done:
        search.advance([candidates(beam.token_ids, seed) for beam in search.live])
    return search.best()


def exhaustive(length: int, ends: frozenset[int], length_penalty: float,
               seed: int = 0) -> tuple[tuple[int, ...], float]:
    """The best hypothesis over every token sequence of at most `length` tokens (ending at an end
    token or at `length`), by the same score."""
    best, best_score = None, -math.inf
    for size in range(1, length + 1):
        for tokens in itertools.product(range(VOCAB), repeat=size):
            if any(t in ends for t in tokens[:-1]) or (size < length and tokens[-1] not in ends):
                continue
            total = sum(toy_logprobs(tokens[:i], seed)[t] for i, t in enumerate(tokens))
            score = total / size ** length_penalty
            if score > best_score:
                best, best_score = tokens, score
    return best, best_score


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ends, length_penalty", [(frozenset(), 1.0), (frozenset({3}), 0.0)])
def test_a_beam_wide_enough_to_keep_everything_finds_the_exhaustive_best(seed, ends, length_penalty):
    """Width VOCAB**2 keeps every prefix of 2 tokens alive, so over 3 tokens it is exhaustive (with an
    end token, length_penalty 0 makes extending never raise a score, so stopping early is exact)."""
    search = BeamSearch(VOCAB ** 2, 3, ends, length_penalty=length_penalty)
    best = run(search, seed)[0]
    want, want_score = exhaustive(3, ends, length_penalty, seed)
    assert best.token_ids == want
    assert best.score(length_penalty) == pytest.approx(want_score, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_width_one_is_greedy(seed):
    prefix: tuple[int, ...] = ()
    for _ in range(5):
        token = max(range(VOCAB), key=lambda t: toy_logprobs(prefix, seed)[t])
        prefix += (token,)
        if token == 2:
            break
    got = run(BeamSearch(1, 5, {2}), seed)[0]
    assert got.token_ids == prefix
    assert got.finish_reason == ("stop" if prefix[-1] == 2 else "length")


def test_an_end_token_counts_only_among_the_best_beam_width():
    search = BeamSearch(2, 4, {9})
    search.advance([[(5, -0.1), (6, -0.2), (9, -0.3), (7, -0.4)]])  # 9 is third: not a hypothesis
    assert search.finished == [] and [b.token_ids for b in search.live] == [(5,), (6,)]
    search.advance([[(9, -0.05), (1, -3.0)], [(2, -0.1), (3, -0.2)]])  # (5, 9) ranks first: finished
    assert [b.token_ids for b in search.finished] == [(5, 9)] and search.finished[0].finish_reason == "stop"
    assert [b.token_ids for b in search.live] == [(6, 2), (6, 3)]  # the ending did not take a live slot


def test_length_penalty_ranks_the_finished_hypotheses():
    short = Beam((1, 9), -2.0, finish_reason="stop")
    long = Beam((1, 2, 3, 9), -3.0, finish_reason="stop")
    assert short.score(1.0) == -1.0 and long.score(1.0) == -0.75  # per token: the long one wins
    assert short.score(0.0) > long.score(0.0)  # summed: the short one wins
    search = BeamSearch(2, 8, {9}, length_penalty=1.0, n=2)
    search._add_finished(short)
    search._add_finished(long)
    assert [b.token_ids for b in search.finished] == [long.token_ids, short.token_ids]


def test_early_stopping_ends_once_beam_width_finished():
    def step(search):
        search.advance([[(9, -0.5), (4, -0.6), (5, -0.7)] for _ in search.live])

    eager, patient = BeamSearch(2, 10, {9}, early_stopping=True), BeamSearch(2, 10, {9}, length_penalty=-1.0)
    for search in (eager, patient):
        step(search)  # (9,) finishes; (4,) and (5,) live
        step(search)  # (4, 9) finishes: two hypotheses
    assert eager.done
    # Without it, the search goes on while the best live beam could still beat the worst hypothesis
    # at its current length; with length_penalty -1 longer is worse, so it is over too.
    assert patient.done
    hopeful = BeamSearch(2, 10, {9}, length_penalty=2.0)
    for _ in range(2):
        step(hopeful)
    assert not hopeful.done  # a penalty of 2 favours length: the live beams may still win


def test_max_tokens_finishes_live_beams_with_length_and_best_returns_n():
    search = BeamSearch(3, 2, set(), n=2)
    best = run(search)
    assert len(best) == 2 and all(b.finish_reason == "length" and len(b.token_ids) == 2 for b in best)
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    with pytest.raises(ValueError, match="live beams"):
        BeamSearch(2, 3, set()).advance([])
    with pytest.raises(ValueError, match="n <= beam_width"):
        BeamSearch(2, 3, set(), n=3)


def test_driver_helpers():
    params = SamplingParams(beam_width=3, logprobs=8, ignore_eos=False, stop_token_ids=(7,))
    step = step_params(params)
    assert (step.temperature, step.max_tokens, step.logprobs, step.ignore_eos) == (0.0, 1, 8, True)
    assert step_params(SamplingParams(beam_width=5)).logprobs == 10
    assert end_ids(params, frozenset({1})) == {1, 7}
    assert end_ids(SamplingParams(beam_width=2, ignore_eos=True), frozenset({1})) == set()
    beam = Beam((4, 5), -0.9, ((( 4, -0.4), (2, -0.5)), ((3, -0.3), (5, -0.5))))
    logprobs = token_logprobs(beam, 1)
    assert [(lp.token_id, lp.logprob, lp.top) for lp in logprobs] == [(4, -0.4, [(4, -0.4)]), (5, -0.5, [(3, -0.3)])]


@pytest.mark.parametrize("field, value", [("stop", ["x"]), ("repetition_penalty", 1.2), ("presence_penalty", 0.5),
                                          ("frequency_penalty", 0.5), ("regex", "a+"), ("choice", ["a", "b"])])
def test_fields_beam_search_cannot_honour_are_rejected_by_name(field, value):
    SamplingParams(beam_width=0, **{field: value})  # fine without beam search (0, the default)
    for width in (1, 2):
        with pytest.raises(ValueError, match=f"^{field} is not supported with beam search"):
            SamplingParams(beam_width=width, **{field: value})


@pytest.mark.parametrize("kwargs, field", [(dict(beam_width=-1), "beam_width"), (dict(beam_width=11), "beam_width"),
                                           (dict(length_penalty=math.inf), "length_penalty"),
                                           (dict(early_stopping="yes"), "early_stopping")])
def test_bad_beam_fields(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)

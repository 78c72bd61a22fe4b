"""Beam search as a driver over an engine that scores one next token. Plain Python (no torch).

Like vLLM V1, beam search lives outside the engine's core: every step, each live beam becomes
one single-token request (prompt + the beam's tokens, greedy, max_tokens 1, logprobs =
2 x beam_width), and `BeamSearch.advance` takes those requests' best candidates. With prefix
caching the requests reuse the beam's cached full blocks, so a step computes at most one block
of positions per beam, and beams run in the same continuous batch as everything else.

The rule (Hugging Face's, so results compare with `generate(num_beams=...)`):
- candidates are every live beam extended by each of its best 2 x beam_width tokens, ranked by
  cumulative log-probability (the model's, before temperature or penalties);
- walking that ranking, a candidate that ends (eos, or a stop token id) becomes a finished
  hypothesis if it ranks among the first beam_width; the first beam_width others are the next
  live beams (so an ending never crowds out a live beam);
- hypotheses are ranked by cumulative_logprob / generated_tokens ** length_penalty, an end token
  counted (> 0 favours longer outputs, < 0 shorter ones);
- the search ends when no beam is live, at max_tokens (live beams finish with "length"), or, once
  beam_width hypotheses have finished: at once with early_stopping, else when the best live beam
  can no longer beat the worst of them at its current length.
The result is the best `n` hypotheses, best first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

Candidate = tuple[int, float]  # (token id, log-probability), from one beam's next-token distribution


@dataclasses.dataclass(frozen=True)
class Beam:
    """One hypothesis: generated tokens, their summed log-probability, and how it ended."""

    token_ids: tuple[int, ...] = ()
    cumulative_logprob: float = 0.0
    # Per token: the candidates it was chosen from (best first), for reporting logprobs.
    steps: tuple[tuple[Candidate, ...], ...] = ()
    finish_reason: str | None = None  # "stop" (an end token) or "length"; None while live

    def extended(self, token_id: int, logprob: float, candidates: tuple[Candidate, ...],
                 finish_reason: str | None = None) -> "Beam":
        """This beam with one more token."""
        return Beam(self.token_ids + (token_id,), self.cumulative_logprob + logprob, self.steps + (candidates,),
                    finish_reason)

    def score(self, length_penalty: float) -> float:
        """cumulative_logprob / generated_tokens ** length_penalty, the ranking of hypotheses (an
        end token counts, as in transformers)."""
        return self.cumulative_logprob / max(1, len(self.token_ids)) ** length_penalty


class BeamSearch:
    """The state of one prompt's beam search; a driver alternates `live` and `advance`."""

    def __init__(self, beam_width: int, max_tokens: int, end_ids: frozenset[int] | set[int],
                 length_penalty: float = 1.0, early_stopping: bool = False, n: int = 1):
        """max_tokens: most generated tokens (already capped by the context); end_ids: tokens that
        finish a beam (eos and stop ids; empty with ignore_eos); n: hypotheses to return."""
        if beam_width < 1 or max_tokens < 1 or not 1 <= n <= beam_width:
            raise ValueError(f"need beam_width >= 1, max_tokens >= 1 and 1 <= n <= beam_width; got "
                             f"{beam_width}, {max_tokens}, {n}")
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.end_ids = frozenset(end_ids)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.n = n
        self.live: list[Beam] = [Beam()]  # the beams the next step extends
        self.finished: list[Beam] = []  # hypotheses, best first, at most beam_width
        self.steps = 0

    @property
    def candidates_per_beam(self) -> int:
        """How many best next tokens each live beam must report (2 x beam_width)."""
        return 2 * self.beam_width

    @property
    def done(self) -> bool:
        """True once the search is over (see the module docstring)."""
        if not self.live:
            return True
        if len(self.finished) < self.beam_width:
            return False
        if self.early_stopping:
            return True
        best_live = max(beam.score(self.length_penalty) for beam in self.live)
        return self.finished[-1].score(self.length_penalty) >= best_live

    def advance(self, candidates: Sequence[Sequence[Candidate]]) -> None:
        """Extend the search by one token: candidates[i] are live beam i's best next tokens with
        their log-probabilities, best first (at least `candidates_per_beam`, or the vocabulary)."""
        if len(candidates) != len(self.live):
            raise ValueError(f"expected candidates for {len(self.live)} live beams, got {len(candidates)}")
        ranked = sorted(((beam.cumulative_logprob + logprob, index, rank, token_id, logprob)
                         for index, (beam, options) in enumerate(zip(self.live, candidates))
                         for rank, (token_id, logprob) in enumerate(options[:self.candidates_per_beam])),
                        key=lambda c: (-c[0], c[1], c[2]))  # best first; ties: earlier beam, better rank
        self.steps += 1
        last_step = self.steps >= self.max_tokens
        frozen = [tuple((int(t), float(lp)) for t, lp in options) for options in candidates]
        live = []
        for position, (_, index, _, token_id, logprob) in enumerate(ranked):
            options = frozen[index]
            if token_id in self.end_ids:
                if position < self.beam_width:  # an ending only counts among the best beam_width
                    self._add_finished(self.live[index].extended(token_id, logprob, options, "stop"))
                continue
            live.append(self.live[index].extended(token_id, logprob, options, "length" if last_step else None))
            if len(live) == self.beam_width:
                break
        if last_step:
            for beam in live:
                self._add_finished(beam)
            live = []
        self.live = live

    def _add_finished(self, beam: Beam) -> None:
        """Keep the beam_width best hypotheses, best first (a new one ranks after equal scores)."""
        score = beam.score(self.length_penalty)
        at = next((i for i, b in enumerate(self.finished) if b.score(self.length_penalty) < score), len(self.finished))
        self.finished.insert(at, beam)
        del self.finished[self.beam_width:]

    def best(self) -> list[Beam]:
        """The n best hypotheses, best first. Beams still live when the search ended early could
        not beat the finished ones; they only fill in (as "length") when fewer than n finished."""
        missing = max(0, self.n - len(self.finished))
        extra = sorted(self.live, key=lambda b: -b.score(self.length_penalty))[:missing]
        return self.finished[:self.n] + [dataclasses.replace(beam, finish_reason="length") for beam in extra]


# ------------------------------------------------------------------ what drivers share


def step_params(params):
    """SamplingParams of one beam's single-token request: greedy, one token, its best
    2 x beam_width tokens (or the caller's logprobs, if more) reported with their logprobs."""
    from gemma_dist.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          logprobs=max(2 * params.beam_width, params.logprobs))


def end_ids(params, eos_ids: frozenset[int]) -> frozenset[int]:
    """Tokens that finish a beam: the request's stop ids, and eos (<end_of_turn> for a chat)
    unless ignore_eos."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))


def search_for(params, prompt_len: int, max_context: int, eos_ids: frozenset[int], n: int = 1) -> BeamSearch:
    """A BeamSearch for a prompt of prompt_len tokens (max_tokens capped by the context)."""
    return BeamSearch(params.beam_width, min(params.max_tokens, max_context - prompt_len), end_ids(params, eos_ids),
                      params.length_penalty, params.early_stopping, n)


def token_logprobs(beam: Beam, top: int) -> list:
    """The beam's per-token TokenLogprob with its `top` best alternatives (for params.logprobs)."""
    from gemma_dist.sampling import TokenLogprob

    return [TokenLogprob(token_id, dict(options)[token_id], list(options[:top]))
            for token_id, options in zip(beam.token_ids, beam.steps)]

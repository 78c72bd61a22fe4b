"""Sampling parameters and the batched token sampler.

`SamplingParams` is the validated, immutable per-request contract (DESIGN.md section 3).
`Sampler` turns one engine step's logits, shape (B, V) fp32, into one token per row, each row
with its own parameters. For every row the steps are, in order:

  a. repetition penalty over the distinct tokens in prompt + output (HF / CTRL rule): a positive
     logit is divided by `repetition_penalty`, a negative one multiplied by it;
  b. frequency and presence penalties over the output tokens only:
     logit -= frequency_penalty * count + presence_penalty * (count > 0);
  c. greedy rows (temperature 0) take the argmax of the penalized logits (first index on ties);
  d. temperature: logits / temperature;
  e. top-k: keep the k largest logits (0 = off);
  f. top-p (nucleus) on the top-k distribution: keep the smallest best-first set whose probability
     mass reaches top_p (a token survives iff the mass strictly before it is < top_p), so the best
     token is always kept;
  g. min-p: drop tokens whose probability < min_p * the largest probability (a ratio, so it does
     not matter whether it is measured before or after the top-p renormalization);
  h. sample from what is left, renormalized.

Logprobs are `log_softmax` of the raw model logits (before penalties and temperature, as OpenAI
and vLLM report them): the chosen token's value plus the best `params.logprobs` alternatives.

Randomness: every sampled row consumes exactly one uniform number per step and picks its token by
inverting the cumulative distribution of the kept tokens. A row with its own generator (a request
with a seed, see `make_generator`) draws only from that generator and is computed on its own
(a one-row batch, the same shapes every step), so the same seed and the same logits give the same
tokens whatever else shares the batch and at whatever row position. Unseeded rows draw from the
sampler's shared generator and are batched. Greedy rows draw nothing.

Speed (2-core CPU, V = 262,144, B up to 64): an all-greedy batch is one blockwise argmax; top-k
rows run a blockwise top-k and do everything else on the k candidates; only rows with top_k 0 and
top_p < 1 need sorting, and even they first try the best `NUCLEUS_CANDIDATES` tokens and sort the
full vocabulary only when the nucleus is larger. Penalties scatter into the rows that have them.
The caller's logits are never modified; copies and full-vocabulary temporaries go to buffers the
sampler reuses, because a fresh 32 MB allocation costs more here (page faults) than the work on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each beam's step reports its best 2 x beam_width tokens as logprobs
MAX_ABS_PRESENCE_FREQUENCY_PENALTY = 2.0
SEED_LIMIT = 2**64  # seeds are proto uint64

# Nucleus rows (top_k 0, top_p < 1) look for the nucleus among this many best tokens before
# falling back to a full-vocabulary sort.
NUCLEUS_CANDIDATES = 1024
# Block sizes of the blockwise argmax / top-k (see `blockwise_argmax`, `blockwise_topk`).
ARGMAX_BLOCK = 1024
TOPK_BLOCK = 64


class SamplingParamsError(ValueError):
    """A SamplingParams field is invalid; the message starts with the field's name."""


# ----------------------------------------------------------------------------------------------
# SamplingParams


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; defaults are Gemma's recommended ones."""

    temperature: float = 1.0  # softmax temperature, >= 0; 0 = greedy (argmax)
    top_p: float = 0.95  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 64  # keep the k most likely tokens, >= 0; 0 = off
    min_p: float = 0.0  # drop tokens below min_p * the top probability, in [0, 1]; 0 = off
    max_tokens: int = 256  # most tokens to generate, >= 1
    stop: tuple[str, ...] = ()  # stop strings (not part of the output); a str or list is accepted
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation, each >= 0
    seed: int | None = None  # per-request seed in [0, 2**64) for reproducible sampling
    repetition_penalty: float = 1.0  # > 0; over prompt + output tokens, CTRL rule; 1 = off
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from every token in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the output
    logprobs: int = 0  # report the chosen token's logprob and this many alternatives, 0..20
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    # Structured output (at most one; gemma_dist.structured): the output follows a JSON schema
    # (JSON text), a regular expression, or is one of the choices.
    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    # Beam search (gemma_dist.beam_search) when beam_width >= 1 (0: sampling): keep the beam_width
    # most likely hypotheses by the model's log-probabilities (temperature, top_p, top_k, min_p and
    # seed do not apply), rank finished ones by cumulative logprob / length ** length_penalty, and with
    # early_stopping end as soon as beam_width of them finished.
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        def set_field(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # frozen dataclass: normalize in place

        temperature = _finite_real("temperature", self.temperature)
        _require(temperature >= 0, "temperature", "must be >= 0", temperature)
        set_field("temperature", temperature)

        top_p = _finite_real("top_p", self.top_p)
        _require(0 < top_p <= 1, "top_p", "must be in (0, 1]", top_p)
        set_field("top_p", top_p)

        top_k = _integer("top_k", self.top_k)
        _require(top_k >= 0, "top_k", "must be >= 0", top_k)
        set_field("top_k", top_k)

        min_p = _finite_real("min_p", self.min_p)
        _require(0 <= min_p <= 1, "min_p", "must be in [0, 1]", min_p)
        set_field("min_p", min_p)

        max_tokens = _integer("max_tokens", self.max_tokens)
        _require(max_tokens >= 1, "max_tokens", "must be >= 1", max_tokens)
        set_field("max_tokens", max_tokens)

        set_field("stop", _stop_strings(self.stop))
        set_field("stop_token_ids", _stop_token_ids(self.stop_token_ids))

        if self.seed is not None:
            seed = _integer("seed", self.seed)
            _require(0 <= seed < SEED_LIMIT, "seed", "must be in [0, 2**64)", seed)
            set_field("seed", seed)

        repetition_penalty = _finite_real("repetition_penalty", self.repetition_penalty)
        _require(repetition_penalty > 0, "repetition_penalty", "must be > 0", repetition_penalty)
        set_field("repetition_penalty", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _finite_real(name, getattr(self, name))
            bound = MAX_ABS_PRESENCE_FREQUENCY_PENALTY
            _require(-bound <= value <= bound, name, f"must be in [{-bound:g}, {bound:g}]", value)
            set_field(name, value)

        logprobs = _integer("logprobs", self.logprobs)
        _require(
            0 <= logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}]", logprobs
        )
        set_field("logprobs", logprobs)

        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

        if self.choice is not None:
            set_field("choice", _as_tuple("choice", self.choice))
        for name in ("json_schema", "regex"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingParamsError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.constrained:
            from gemma_dist.structured import ConstraintError, grammar_of

            try:
                grammar_of(self.json_schema, self.regex, self.choice)  # compiles it: fails here, not mid-generation
            except ConstraintError as e:
                raise SamplingParamsError(str(e)) from None
        self._check_beam_search(set_field)

    def _check_beam_search(self, set_field) -> None:
        """Validate the beam-search fields, and the fields beam search cannot honour."""
        beam_width = _integer("beam_width", self.beam_width)
        _require(0 <= beam_width <= MAX_BEAM_WIDTH, "beam_width", f"must be in [0, {MAX_BEAM_WIDTH}]", beam_width)
        set_field("beam_width", beam_width)
        set_field("length_penalty", _finite_real("length_penalty", self.length_penalty))
        if not isinstance(self.early_stopping, bool):
            raise SamplingParamsError(f"early_stopping must be a bool, got {self.early_stopping!r}")
        if not beam_width:
            return
        in_use = {"stop": bool(self.stop), "repetition_penalty": self.repetition_penalty != 1,
                  "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                  "json_schema": self.json_schema is not None, "regex": self.regex is not None,
                  "choice": self.choice is not None}
        field = next((name for name, used in in_use.items() if used), None)
        if field is not None:
            raise SamplingParamsError(f"{field} is not supported with beam search (beam_width {beam_width}); "
                                      f"beams are ranked by the model's own log-probabilities")

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar of the structured-output constraint, or None."""
        from gemma_dist.structured import grammar_of

        return grammar_of(self.json_schema, self.regex, self.choice)

    @property
    def constrained(self) -> bool:
        """True when a structured-output constraint is set."""
        return self.json_schema is not None or self.regex is not None or self.choice is not None

    @property
    def beam_search(self) -> bool:
        """True when the request runs beam search (beam_width >= 1)."""
        return self.beam_width >= 1

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def argmax_only(self) -> bool:
        """True when the token is the plain argmax of the model's logits: greedy, with no penalties,
        logprobs, constraint or beams (the runner then never builds the row's full logits)."""
        return (self.is_greedy and not self.has_penalties and self.logprobs == 0 and not self.constrained
                and not self.beam_search)

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition, presence or frequency penalties is on."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} {rule}, got {value!r}")


def _finite_real(name: str, value: object) -> float:
    # bool is an int subclass: True is not a temperature.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be finite, got {value!r}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(f"{name} must be an int, got {value!r}")
    return int(value)


def _stop_strings(value: str | Iterable[str]) -> tuple[str, ...]:
    strings = (value,) if isinstance(value, str) else _as_tuple("stop", value)
    if len(strings) > MAX_STOP_STRINGS:
        raise SamplingParamsError(
            f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(strings)}"
        )
    for string in strings:
        if not isinstance(string, str):
            raise SamplingParamsError(f"stop must contain strings, got {string!r}")
        if not string:
            raise SamplingParamsError("stop strings must be non-empty")
        if len(string) > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError(
                f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, "
                f"got one of {len(string)}"
            )
    return strings


def _stop_token_ids(value: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(_integer("stop_token_ids", token) for token in _as_tuple("stop_token_ids", value))
    for token in ids:
        _require(token >= 0, "stop_token_ids", "must be >= 0", token)
    return ids


def _as_tuple(name: str, value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SamplingParamsError(f"{name} must be a sequence, got {value!r}")
    return tuple(value)


# ----------------------------------------------------------------------------------------------
# Sampler API


@dataclass
class SamplingRow:
    """One sequence's sampling state for this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Per-request generator when params.seed is set (make_generator); None = the shared one.
    generator: torch.Generator | None = None
    constraint: Any = None  # structured.Constraint of a constrained request, on the sampling runner


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top-n alternatives (token_id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleResult:
    """One step's tokens, and logprobs for rows that asked (None for the others)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    # Seconds the runner spent on the step: (prepare, forward, sample); set by the runner, for metrics.
    runner_times: tuple[float, float, float] = (0.0, 0.0, 0.0)
    runner_span: tuple[float, float] = (0.0, 0.0)  # the runner's time.time() at the step's start and end


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one seeded request; keep it for the request's lifetime."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks one token per row of a (B, V) logits batch, each row with its own parameters.

    Not thread-safe: it owns the shared generator and reusable buffers; use one per engine loop.
    """

    def __init__(self, seed: int | None = None) -> None:
        """`seed` fixes the shared generator used by rows without their own generator."""
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()  # nondeterministic; torch's default seed is a constant
        else:
            self.generator.manual_seed(seed)
        # Reused (n, V) fp32 buffers: "rows" holds copies of logits rows (penalized or selected),
        # "work" full-vocabulary temporaries (weights, logsumexp).
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 log_norm: torch.Tensor | None = None) -> SampleResult:
        """Sample one token per row; `logits` (B, V) is left untouched. `log_norm` (B,): the rows'
        logsumexp over the whole vocabulary, when `logits` hold only candidates of it (the
        vocab-parallel path): logprobs are then taken against it."""
        logits = _as_batch_logits(logits, rows)  # (B, V) fp32, contiguous
        if not rows:
            return SampleResult(token_ids=[], logprobs=[])
        constraints = [row.constraint for row in rows]
        if any(c is not None for c in constraints):  # structured output: pick among allowed tokens only
            token_ids = self._choose_constrained(logits, rows)
            for constraint, token in zip(constraints, token_ids.tolist()):
                if constraint is not None:
                    constraint.advance(token)
        else:
            token_ids = self._choose_tokens(logits, rows)  # (B,)
        logprobs = self._collect_logprobs(logits, token_ids, rows, log_norm)
        return SampleResult(token_ids=token_ids.tolist(), logprobs=logprobs)

    # -- tokens --------------------------------------------------------------------------------

    def _choose_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        vocab_size = logits.shape[1]
        uniforms = self._draw_uniforms(rows)  # (B,) fp64, drawn before any work so order is fixed
        token_ids = torch.empty(len(rows), dtype=torch.long)
        for (kind, k, _), row_indices in _plan_groups(rows, vocab_size).items():
            group_rows = [rows[i] for i in row_indices]
            group_logits = self._penalized_rows(logits, group_rows, row_indices)  # (n, V)
            if kind == "greedy":
                picked = blockwise_argmax(group_logits)
            else:
                knobs = _RowKnobs.of(group_rows, uniforms[row_indices])
                picked = self._sample_group(kind, k, group_logits, knobs)
            token_ids[row_indices] = picked
        return token_ids

    def _choose_constrained(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """`_choose_tokens` with structured-output rows restricted to their allowed tokens: the rows
        that need it are masked in place for the choice and restored after (logprobs stay raw)."""
        from gemma_dist.structured import masked_rows

        masked = masked_rows(logits, rows)
        if masked is None:
            return self._choose_tokens(logits, rows)
        index, values = masked
        saved = logits[index]  # a copy (advanced indexing)
        logits[index] = values
        try:
            return self._choose_tokens(logits, rows)
        finally:
            logits[index] = saved

    def _sample_group(
        self, kind: str, k: int, logits: torch.Tensor, knobs: _RowKnobs
    ) -> torch.Tensor:
        """(n, V) logits of one non-greedy group -> (n,) token ids."""
        if kind == "top_k":
            return _sample_top_k(logits, k, knobs)
        workspace = self._buffer("work", *logits.shape)  # (n, V) for full-vocabulary weights
        if kind == "nucleus":
            return _sample_nucleus(logits, knobs, workspace)
        return _sample_full_vocab(logits, knobs, workspace)

    def _draw_uniforms(self, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """One U[0, 1) per sampled row: from its own generator if it has one, else the shared."""
        uniforms = torch.zeros(len(rows), dtype=torch.float64)
        shared = [
            i for i, row in enumerate(rows) if not row.params.is_greedy and row.generator is None
        ]
        if shared:
            uniforms[shared] = torch.rand(
                len(shared), dtype=torch.float64, generator=self.generator
            )
        for i, row in enumerate(rows):
            if not row.params.is_greedy and row.generator is not None:
                uniforms[i] = torch.rand((), dtype=torch.float64, generator=row.generator)
        return uniforms

    def _penalized_rows(
        self, logits: torch.Tensor, group_rows: list[SamplingRow], row_indices: list[int]
    ) -> torch.Tensor:
        """The group's rows of `logits`, penalized: a view if unchanged, else a buffer copy."""
        needs_penalties = any(row.params.has_penalties for row in group_rows)
        first, last = row_indices[0], row_indices[-1]
        if not needs_penalties and last - first + 1 == len(row_indices):
            return logits[first : last + 1]  # consecutive rows: a contiguous view, no copy
        work = self._buffer("rows", len(row_indices), logits.shape[1])  # (n, V)
        torch.index_select(logits, 0, torch.tensor(row_indices), out=work)
        if needs_penalties:
            _apply_penalties_(work, group_rows)
        return work

    def _buffer(self, name: str, num_rows: int, vocab_size: int) -> torch.Tensor:
        """A reusable contiguous (n, V) fp32 view; grows as needed, never shrinks."""
        needed = num_rows * vocab_size
        if name not in self._buffers or self._buffers[name].numel() < needed:
            self._buffers[name] = torch.empty(needed, dtype=torch.float32)
        return self._buffers[name][:needed].view(num_rows, vocab_size)

    # -- logprobs ------------------------------------------------------------------------------

    def _collect_logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow],
        given_log_norm: torch.Tensor | None = None,
    ) -> list[TokenLogprob | None]:
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs > 0]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return result
        raw = logits if len(wanted) == len(rows) else logits[wanted]  # (n, V) raw model logits
        log_norm = self._logsumexp(raw) if given_log_norm is None else given_log_norm[wanted][:, None]  # (n, 1)
        chosen = raw.gather(1, token_ids[wanted][:, None]) - log_norm  # (n, 1)
        most = min(max(rows[i].params.logprobs for i in wanted), logits.shape[1])
        top_logits, top_ids = blockwise_topk(raw, most)  # (n, most) best first
        top_logprobs = top_logits - log_norm
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            result[i] = TokenLogprob(
                token_id=int(token_ids[i]),
                logprob=float(chosen[j, 0]),
                top=list(zip(top_ids[j, :n].tolist(), top_logprobs[j, :n].tolist(), strict=True)),
            )
        return result

    def _logsumexp(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) -> (n, 1); torch.logsumexp is slower on CPU and allocates a full-size temp."""
        row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        shifted = self._buffer("work", *logits.shape)
        torch.sub(logits, row_max, out=shifted).exp_()
        return row_max + shifted.sum(dim=-1, keepdim=True).log_()


def _as_batch_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(
            f"logits must be (B, V) with B = {len(rows)} rows, got shape {tuple(logits.shape)}"
        )
    return logits.float().contiguous()  # no copy when already fp32 and contiguous


def _plan_groups(
    rows: Sequence[SamplingRow], vocab_size: int
) -> dict[tuple[str, int, int], list[int]]:
    """Row indices grouped by (kind, candidate count, owner); see `_group_key`."""
    groups: dict[tuple[str, int, int], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_group_key(row, i, vocab_size), []).append(i)
    return groups


def _group_key(row: SamplingRow, index: int, vocab_size: int) -> tuple[str, int, int]:
    """How a row is sampled. A sampled row with its own generator gets a group of its own
    (owner = its index, else -1): torch's kernels may round differently with the batch's shape
    (a lone row's sum is split across threads, a batch's is not; vectorized and scalar exp
    differ in the last bit), and a seeded row must not depend on its neighbours."""
    params = row.params
    if params.is_greedy:
        return ("greedy", 0, -1)  # argmax is exact whatever the batch
    owner = index if row.generator is not None else -1
    if 0 < params.top_k < vocab_size:
        return ("top_k", params.top_k, owner)
    # top_k off (or at least the vocabulary): all V tokens are candidates.
    return ("nucleus" if params.top_p < 1 else "full_vocab", 0, owner)


# ----------------------------------------------------------------------------------------------
# Penalties


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Logits (B, V) after repetition, frequency and presence penalties; input left untouched."""
    if not any(row.params.has_penalties for row in rows):
        return logits
    penalized = logits.clone(memory_format=torch.contiguous_format)
    _apply_penalties_(penalized, rows)
    return penalized


def _apply_penalties_(logits: torch.Tensor, rows: Sequence[SamplingRow], offset: int | None = None) -> None:
    """In place on a contiguous (B, V) tensor: repetition first, then frequency / presence.
    `offset` (None: the whole vocabulary): the logits are the vocabulary slice [offset, offset + V)
    of a tensor-parallel shard; tokens outside it are skipped."""
    _apply_repetition_penalty_(logits, rows, offset)
    _apply_frequency_presence_penalties_(logits, rows, offset)


def _apply_repetition_penalty_(logits: torch.Tensor, rows: Sequence[SamplingRow],
                               offset: int | None = None) -> None:
    vocab_size = logits.shape[1]
    penalized = [
        (i, _token_tensor(row.prompt_token_ids, row.output_token_ids, vocab_size=vocab_size, offset=offset))
        for i, row in enumerate(rows)
        if row.params.repetition_penalty != 1.0
    ]
    if not penalized:
        return
    # Flat index row * V + token, deduplicated: each (row, token) logit is penalized once.
    flat_index = torch.unique(torch.cat([i * vocab_size + ids for i, ids in penalized]))  # (T,)
    penalty_by_row = torch.tensor(
        [row.params.repetition_penalty for row in rows], dtype=logits.dtype
    )
    penalty = penalty_by_row[flat_index // vocab_size]  # (T,) per-logit penalty
    flat = logits.view(-1)
    values = flat[flat_index]
    flat[flat_index] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_frequency_presence_penalties_(logits: torch.Tensor, rows: Sequence[SamplingRow],
                                         offset: int | None = None) -> None:
    vocab_size = logits.shape[1]
    penalized = [
        (i, _token_tensor(row.output_token_ids, vocab_size=vocab_size, offset=offset))
        for i, row in enumerate(rows)
        if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0
    ]
    if not penalized:
        return
    # Counts per (row, token) of the output: unique over flat indices row * V + token.
    flat_index, counts = torch.unique(
        torch.cat([i * vocab_size + ids for i, ids in penalized]), return_counts=True
    )  # (T,), (T,)
    row_of = flat_index // vocab_size  # (T,)
    frequency = torch.tensor([row.params.frequency_penalty for row in rows], dtype=logits.dtype)
    presence = torch.tensor([row.params.presence_penalty for row in rows], dtype=logits.dtype)
    flat = logits.view(-1)
    penalty = frequency[row_of] * counts.to(logits.dtype) + presence[row_of]  # (T,)
    flat[flat_index] = flat[flat_index] - penalty


def _token_tensor(*token_lists: Sequence[int], vocab_size: int, offset: int | None = None) -> torch.Tensor:
    """The concatenated token ids as a (T,) long tensor, checked to lie in [0, V). With an
    `offset` the logits are a vocabulary shard [offset, offset + V): ids are shifted into it and
    those outside it dropped."""
    ids = torch.cat(
        [torch.as_tensor(tokens, dtype=torch.long).reshape(-1) for tokens in token_lists]
    )
    if offset is None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size}) for penalties")
        return ids
    ids = ids - offset
    return ids[(ids >= 0) & (ids < vocab_size)]


# ----------------------------------------------------------------------------------------------
# Sampling kernels: (n, V) logits of one group -> (n,) token ids, every row independent


@dataclass
class _RowKnobs:
    """Per-row sampling knobs of one group as (n,) tensors."""

    temperature: torch.Tensor  # (n,) fp32, > 0
    top_p: torch.Tensor  # (n,) fp32
    min_p: torch.Tensor  # (n,) fp32
    uniform: torch.Tensor  # (n,) fp64 in [0, 1)

    @staticmethod
    def of(rows: Sequence[SamplingRow], uniforms: torch.Tensor) -> _RowKnobs:
        return _RowKnobs(
            temperature=torch.tensor([row.params.temperature for row in rows], dtype=torch.float32),
            top_p=torch.tensor([row.params.top_p for row in rows], dtype=torch.float32),
            min_p=torch.tensor([row.params.min_p for row in rows], dtype=torch.float32),
            uniform=uniforms,
        )

    def subset(self, index: torch.Tensor) -> _RowKnobs:
        return _RowKnobs(
            self.temperature[index], self.top_p[index], self.min_p[index], self.uniform[index]
        )


def _sample_top_k(logits: torch.Tensor, k: int, knobs: _RowKnobs) -> torch.Tensor:
    """(n, V) -> (n,) token ids; top-p, min-p and the draw run on the k candidates only."""
    candidate_logits, candidate_ids = blockwise_topk(logits, k)  # (n, k) best first
    weights, cdf = _sorted_weights_and_cdf(candidate_logits, knobs.temperature)
    positions = _pick_from_sorted(weights, cdf, cdf[:, -1], knobs)  # (n,)
    return candidate_ids.gather(1, positions[:, None]).squeeze(1)


def _sample_nucleus(
    logits: torch.Tensor, knobs: _RowKnobs, workspace: torch.Tensor
) -> torch.Tensor:
    """(n, V) -> (n,) for top_k off, top_p < 1: the nucleus usually lies in the best few hundred
    tokens, so look there first and sort the whole vocabulary only for rows where it does not."""
    num_candidates = min(NUCLEUS_CANDIDATES, logits.shape[1])
    candidate_logits, candidate_ids = blockwise_topk(logits, num_candidates)  # (n, C) best first
    weights, cdf = _sorted_weights_and_cdf(candidate_logits, knobs.temperature)
    vocab_weights = _relative_weights(
        logits, candidate_logits[:, :1], knobs.temperature, out=workspace
    )
    vocab_mass = vocab_weights.sum(dim=-1)  # (n,) unnormalized mass of the whole distribution
    positions = _pick_from_sorted(weights, cdf, vocab_mass, knobs)
    token_ids = candidate_ids.gather(1, positions[:, None]).squeeze(1)  # (n,)
    if num_candidates == logits.shape[1]:
        return token_ids
    nucleus_fits = cdf[:, -1] >= knobs.top_p * vocab_mass  # the mass threshold is reached within C
    min_p_fits = weights[:, -1] < knobs.min_p  # min-p already cuts inside the candidates
    spill = (~(nucleus_fits | min_p_fits)).nonzero().squeeze(1)
    if spill.numel():
        sorted_logits, sorted_ids = logits[spill].sort(dim=-1, descending=True)  # (s, V)
        spill_knobs = knobs.subset(spill)
        weights, cdf = _sorted_weights_and_cdf(sorted_logits, spill_knobs.temperature)
        positions = _pick_from_sorted(weights, cdf, cdf[:, -1], spill_knobs)
        token_ids[spill] = sorted_ids.gather(1, positions[:, None]).squeeze(1)
    return token_ids


def _sample_full_vocab(
    logits: torch.Tensor, knobs: _RowKnobs, workspace: torch.Tensor
) -> torch.Tensor:
    """(n, V) -> (n,) for top_k off, top_p 1: no ordering needed, draw in vocabulary order."""
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    weights = _relative_weights(logits, row_max, knobs.temperature, out=workspace)  # (n, V)
    if bool((knobs.min_p > 0).any()):
        weights.masked_fill_(weights < knobs.min_p[:, None], 0.0)  # weights are p / p_max
    cdf = weights.cumsum_(dim=-1)  # (n, V), in place: the weights are not needed any more
    return _invert_cdf(cdf, cdf[:, -1:], knobs.uniform).clamp_(max=logits.shape[1] - 1)


def _relative_weights(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    temperature: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp((logits - max) / T), i.e. p / p_max: (n, C), written to `out` if given. Shifting
    before dividing keeps tiny temperatures from overflowing (every exponent is <= 0)."""
    shifted = torch.sub(logits, row_max, out=out) if out is not None else logits - row_max
    return shifted.div_(temperature[:, None]).exp_()


def _sorted_weights_and_cdf(
    sorted_logits: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first (n, C) logits -> unnormalized probabilities (best = 1) and their running sum."""
    weights = _relative_weights(sorted_logits, sorted_logits[:, :1], temperature)  # (n, C)
    return weights, weights.cumsum(dim=-1)


def _pick_from_sorted(
    weights: torch.Tensor, cdf: torch.Tensor, total_mass: torch.Tensor, knobs: _RowKnobs
) -> torch.Tensor:
    """Apply top-p and min-p to best-first candidates and draw: (n, C) -> (n,) positions.

    Both filters keep a best-first prefix, so the kept set is the shorter prefix and its
    cumulative sum is just the start of `cdf`. `total_mass` (n,) is the whole distribution's
    unnormalized mass (more than cdf[:, -1] when the candidates are a subset of the vocabulary).
    """
    num_candidates = cdf.shape[1]
    kept = torch.full((cdf.shape[0],), num_candidates)  # (n,)
    if bool((knobs.top_p < 1).any()):
        threshold = torch.where(knobs.top_p < 1, knobs.top_p * total_mass, math.inf)  # (n,)
        # Token i survives iff the mass before it, cdf[i - 1], is < threshold; cdf is sorted, so
        # count the entries below the threshold (capped: the last entry has no successor).
        below = torch.searchsorted(cdf, threshold[:, None].contiguous()).squeeze(1)  # (n,)
        kept = torch.minimum(kept, 1 + below.clamp_(max=num_candidates - 1))
    if bool((knobs.min_p > 0).any()):
        kept = torch.minimum(kept, (weights >= knobs.min_p[:, None]).sum(dim=-1))  # p / p_max
    kept.clamp_(min=1)
    kept_mass = cdf.gather(1, (kept - 1)[:, None])  # (n, 1)
    return torch.minimum(_invert_cdf(cdf, kept_mass, knobs.uniform), kept - 1)


def _invert_cdf(cdf: torch.Tensor, mass: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: first position whose running sum exceeds uniform * mass. (n, C) -> (n,)."""
    target = (uniform[:, None] * mass.double()).float()  # (n, 1)
    # Stay strictly below the kept mass so rounding can never step past the last kept token.
    target = torch.minimum(target, torch.nextafter(mass, torch.zeros_like(mass)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Blockwise argmax / top-k: torch's CPU argmax and topk scan the row element by element, while
# amax over blocks is vectorized, so reduce blocks first and finish inside the winning blocks.


def blockwise_argmax(logits: torch.Tensor, block: int = ARGMAX_BLOCK) -> torch.Tensor:
    """Same as logits.argmax(-1) (first index on ties) for (n, V) logits, several times faster."""
    num_rows, vocab_size = logits.shape
    if vocab_size % block or vocab_size < 4 * block or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(num_rows, vocab_size // block, block)  # (n, V / block, block)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # (n,) first block holding the max
    within = blocks[torch.arange(num_rows), best_block].argmax(dim=-1)  # (n,)
    return best_block * block + within


def blockwise_topk(
    logits: torch.Tensor, k: int, block: int = TOPK_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values as logits.topk(k, -1) (best first; ties may pick other equal entries), faster.

    The k largest entries lie in the k blocks with the largest maxima: an entry outside them is
    beaten by k block maxima. So top-k the block maxima, then top-k inside those k blocks.
    """
    num_rows, vocab_size = logits.shape
    if vocab_size % block or k * block * 4 > vocab_size or not logits.is_contiguous():
        return logits.topk(k, dim=-1)
    blocks = logits.view(num_rows, vocab_size // block, block)  # (n, V / block, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (n, k)
    candidates = blocks[torch.arange(num_rows)[:, None], best_blocks]  # (n, k, block)
    values, positions = candidates.reshape(num_rows, -1).topk(k, dim=-1)  # (n, k)
    # Position p in the candidates is offset p % block in block best_blocks[p // block].
    token_ids = best_blocks.gather(1, positions // block) * block + positions % block  # (n, k)
    return values, token_ids


# ----------------------------------------------------------------------------------------------
# Vocabulary-parallel sampling: tensor-parallel ranks each hold a slice of the logits


MAX_SHARD_CANDIDATES = 1024  # rows needing more candidates per shard than this gather whole rows


def shard_candidates(row: SamplingRow) -> int | None:
    """Best tokens a row needs from each vocabulary shard, or None when it needs the whole row.

    Greedy rows need 1, top-k rows k, plus the logprobs they report. The union of every shard's
    best k holds the row's global best k, so sampling from it picks what the whole row would.
    Rows without top-k (nucleus, full vocabulary), rows that report logprobs of penalized
    logits (logprobs are of the raw logits, the choice of the penalized ones) and structured-output
    rows (a mask over the whole vocabulary) need whole rows."""
    params = row.params
    if params.constrained:  # its mask is over the whole vocabulary (decided from params: every rank agrees,
        return None  # though only the sampling rank holds the grammar state)
    if params.is_greedy:
        k = 1
    elif 0 < params.top_k <= MAX_SHARD_CANDIDATES:
        k = params.top_k
    else:
        return None
    if params.logprobs:
        if params.has_penalties:
            return None
        k = max(k, params.logprobs)
    return k


def sample_vocab_parallel(local: torch.Tensor, rows: Sequence[SamplingRow], vocab_start: int, vocab_size: int,
                          gather_last_dim, sampler: Sampler | None) -> SampleResult | None:
    """Sample over logits split by vocabulary across tensor-parallel ranks, moving candidates
    instead of whole rows. Every rank calls this with the same rows (collectives inside).

    local: (S, V_local) fp32, this rank's logits for ids [vocab_start, vocab_start + V_local);
    ids >= vocab_size (padding, or beyond the tokenizer) are never picked (masked in `local` in
    place, as `sample_rows` does at tp=1). gather_last_dim:
    concatenates every rank's tensor along the last dim (rank order). sampler: rank 0's (it
    draws the random numbers), None elsewhere (returns None).

    Rows that need candidates (`shard_candidates`) send each shard's penalized top-K (values,
    ids) and its raw logsumexp: (S, 2K + 1) floats per rank instead of (S, V_local). Rank 0 puts
    the candidates in id order and runs the ordinary sampler on them, so ties, top-k, top-p,
    min-p and seeded draws behave as on whole rows; logprobs use the combined logsumexp. The
    other rows gather whole rows and are sampled as at tp=1."""
    width = local.shape[1]
    limit = vocab_size - vocab_start  # columns at or past it are no token
    if limit < width:
        local[:, max(0, limit):] = float("-inf")
    wanted = [shard_candidates(row) for row in rows]
    picks = [i for i, k in enumerate(wanted) if k is not None]
    whole = [i for i, k in enumerate(wanted) if k is None]
    token_ids = [0] * len(rows)
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if picks:
        mine = local if len(picks) == len(rows) else local[picks]
        chosen = _sample_from_candidates(mine, [rows[i] for i in picks], max(wanted[i] for i in picks),
                                         vocab_start, gather_last_dim, sampler)
        if chosen is not None:
            for j, i in enumerate(picks):
                token_ids[i], logprobs[i] = chosen.token_ids[j], chosen.logprobs[j]
    if whole:
        full = gather_last_dim(local[whole].contiguous())[:, :vocab_size]  # (W, V)
        if sampler is not None:
            chosen = sampler(full, [rows[i] for i in whole])
            for j, i in enumerate(whole):
                token_ids[i], logprobs[i] = chosen.token_ids[j], chosen.logprobs[j]
    return SampleResult(token_ids, logprobs) if sampler is not None else None


def _sample_from_candidates(local: torch.Tensor, rows: list[SamplingRow], k: int, vocab_start: int,
                            gather_last_dim, sampler: Sampler | None) -> SampleResult | None:
    """The candidate exchange of `sample_vocab_parallel`: local (S, V_local) holds these rows."""
    num_rows, k = local.shape[0], min(k, local.shape[1])
    penalized = local
    if any(row.params.has_penalties for row in rows):
        penalized = local.clone()
        _apply_penalties_(penalized, rows, offset=vocab_start)
    if k == 1:  # greedy only: the first index among equal maxima, as the whole row's argmax
        ids = blockwise_argmax(penalized.contiguous())[:, None]
        values = penalized.gather(1, ids)
    else:
        values, ids = blockwise_topk(penalized.contiguous(), k)  # (S, k)
    # One message per rank: values, ids (exact in fp32 below 2**24) and the raw logsumexp.
    parts = [values, (ids + vocab_start).float()]
    with_logprobs = any(row.params.logprobs for row in rows)
    if with_logprobs:
        parts.append(torch.logsumexp(local, dim=1, keepdim=True))  # raw logits; a shard of -inf gives -inf
    packed = torch.cat(parts, dim=1)  # (S, 2k [+ 1])
    gathered = gather_last_dim(packed.contiguous())  # (S, tp * width)
    if sampler is None:
        return None
    blocks = gathered.view(num_rows, -1, packed.shape[1])  # (S, tp, width)
    candidate_ids = blocks[:, :, k: 2 * k].reshape(num_rows, -1).long()  # (S, tp * k)
    order = candidate_ids.argsort(dim=1)  # id order: ties resolve to the lowest id, as on whole rows
    candidate_ids = candidate_ids.gather(1, order)
    candidates = blocks[:, :, :k].reshape(num_rows, -1).gather(1, order).contiguous()
    log_norm = None
    if with_logprobs:
        log_norm = torch.logsumexp(blocks[:, :, 2 * k], dim=1)  # (S,) over the shards' (S, tp) norms
    plain = [row if not row.params.has_penalties else SamplingRow(  # penalties were applied on the shards
        _without_penalties(row.params), row.prompt_token_ids, row.output_token_ids, row.generator, row.constraint)
        for row in rows]
    result = sampler(candidates, plain, log_norm)
    token_ids = candidate_ids.gather(1, torch.tensor(result.token_ids)[:, None]).squeeze(1).tolist()
    logprobs = [None if lp is None else TokenLogprob(
        token_ids[j], lp.logprob, [(int(candidate_ids[j, position]), value) for position, value in lp.top])
        for j, lp in enumerate(result.logprobs)]
    return SampleResult(token_ids, logprobs)


def _without_penalties(params: SamplingParams) -> SamplingParams:
    """The same parameters with repetition / presence / frequency penalties off."""
    return replace(params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)

"""Structured output: JSON-schema, regex and choice constraints as token masks (llguidance).

A request's constraint compiles to an llguidance grammar. On the runner that samples, each
constrained request keeps a `Constraint` (a matcher over the token stream): before a step's
tokens are picked, it fills the row's allowed-token bitmask, which the batched sampler applies
to that row only (constrained and free rows share the step); after, it consumes the picked
token. When the grammar is complete only the end tokens (<eos>, <end_of_turn>) stay allowed.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from gemma_dist.tokenizer import Tokenizer

CONSTRAINT_FIELDS = ("json_schema", "regex", "choice")  # SamplingParams fields that constrain the output
MAX_CHOICES = 256
# llguidance's JSON layout options: fixed separators (a schema's own "x-guidance" wins).
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint does not compile; the message starts with its field's name."""


def _llguidance():
    import llguidance

    return llguidance


def grammar_of(json_schema: str | None, regex: str | None, choice: Sequence[str] | None) -> str | None:
    """The llguidance grammar of at most one constraint, checked (ConstraintError naming the field);
    None when there is none."""
    if choice is not None and not (isinstance(choice, (list, tuple)) and 0 < len(choice) <= MAX_CHOICES
                                   and all(isinstance(c, str) and c for c in choice)):
        raise ConstraintError(f"choice must hold 1..{MAX_CHOICES} non-empty strings")
    return _compiled_grammar(json_schema, regex, None if choice is None else tuple(choice))


@functools.lru_cache(maxsize=256)
def _compiled_grammar(json_schema: str | None, regex: str | None, choice: tuple[str, ...] | None) -> str | None:
    """`grammar_of` for hashable arguments, cached: a request's constraint is compiled where it is
    validated (the gateway) and again where it is sampled, and many requests share one schema."""
    given = [name for name, value in zip(CONSTRAINT_FIELDS, (json_schema, regex, choice)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(f"{given[1]} cannot be combined with {given[0]}: give one constraint")
    g = _llguidance()
    if json_schema is not None:
        try:
            schema = json.loads(json_schema)
        except (TypeError, json.JSONDecodeError) as e:
            raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ConstraintError("json_schema must be a JSON object (a schema)")
        if "x-guidance" not in schema:  # one space after "," and ":", no newlines: a sampled run of
            schema = {**schema, "x-guidance": _JSON_LAYOUT}  # whitespace cannot eat max_tokens
        field, grammar = "json_schema", g.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    elif regex is not None:
        field, grammar = "regex", g.LLMatcher.grammar_from_regex(regex)
    else:
        field, grammar = "choice", g.grammar_from("choice", json.dumps(list(choice)))
    error = g.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"{field} does not compile: {error.strip().splitlines()[0]}")
    return grammar


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer: "Tokenizer", vocab_size: int):
    """llguidance's view of the Gemma vocabulary (each token's bytes; control tokens marked
    special), `vocab_size` wide (the model's logits), ending on <eos> or <end_of_turn>. ~1 s: cached."""
    g = _llguidance()
    tokens = []
    for token_id in range(tokenizer.vocab_size):
        byte = tokenizer._byte_value(token_id)
        if byte is not None:
            tokens.append(bytes([byte]))
        elif tokenizer.is_special(token_id):
            tokens.append(b"\xff" + tokenizer.id_to_piece(token_id).encode())
        else:
            tokens.append(tokenizer.id_to_piece(token_id).replace("\u2581", " ").encode())
    ends = sorted(tokenizer.stop_token_ids(chat=True))

    class _Vocabulary:  # what llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

        def __init__(self):
            self.tokens = tokens

        def __call__(self, text: str) -> list[int]:
            return tokenizer.encode(text, add_bos=False)

    return g.LLTokenizer(g.TokenizerWrapper(_Vocabulary()), n_vocab=max(vocab_size, len(tokens)), eos_token=ends)


class Constraint:
    """One request's grammar state on the sampling runner."""

    def __init__(self, grammar: str, lltokenizer, generated: Sequence[int] = ()):
        """`generated`: tokens the request already has (a request resumed elsewhere replays them)."""
        self.matcher = _llguidance().LLMatcher(lltokenizer, grammar)
        self.ends = list(lltokenizer.eos_tokens)
        if generated:
            self.matcher.consume_tokens(list(generated))

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into one int32 bitmask row (bit t of word t // 32); only the
        end tokens once the grammar is complete or broken."""
        if self.matcher.is_stopped() or self.matcher.is_error():
            bitmask_row.zero_()
            for token in self.ends:
                bitmask_row[token // 32] |= _bit(token % 32)
            return
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def advance(self, token_id: int) -> None:
        """Consume the picked token (one the mask allowed)."""
        if not (self.matcher.is_stopped() or self.matcher.is_error()):
            self.matcher.consume_token(token_id)


def _bit(position: int) -> int:
    """int32 value with only bit `position` set (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


MAX_CHECKED_CANDIDATES = 1024  # rows sampling from more candidates than this always get the whole mask


def masked_rows(logits: torch.Tensor, rows) -> tuple[list[int], torch.Tensor] | None:
    """For the constrained rows of a (B, V) logits batch (SamplingRows with a constraint): which
    rows need their disallowed tokens masked, and those rows (R, V) masked (-inf); None when none
    does. A row whose sampler only looks at its best k logits (greedy: 1; top-k without penalties:
    k) needs no mask when those k are all allowed and strictly above the next: the masked row's
    best k are then the same tokens, so it picks what the masked row would (the common case,
    which skips unpacking a 262,144-bit mask)."""
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    vocab = logits.shape[1]
    bitmask = _bitmasks([rows[i].constraint for i in constrained], vocab)
    wanted = [_candidates(rows[i].params, vocab) for i in constrained]
    need = [j for j, k in enumerate(wanted) if k is None]
    checked = [j for j, k in enumerate(wanted) if k is not None]
    if checked:
        from gemma_dist.sampling import blockwise_topk

        picked = [constrained[j] for j in checked]
        block = logits if len(picked) == logits.shape[0] else logits[picked].contiguous()
        values, ids = blockwise_topk(block, max(wanted[j] for j in checked) + 1)  # (C, kmax + 1)
        words = bitmask[checked].gather(1, ids // 32)  # (C, kmax + 1) the int32 word of each candidate
        allowed = ((words >> (ids % 32).to(torch.int32)) & 1).bool()
        for c, j in enumerate(checked):
            k = wanted[j]
            if not (bool(allowed[c, :k].all()) and bool(values[c, k - 1] > values[c, k])):
                need.append(j)
    if not need:
        return None
    need.sort()
    index = [constrained[j] for j in need]
    return index, logits[index].masked_fill_(~_allowed(bitmask[need], vocab), float("-inf"))


def _bitmasks(constraints: Sequence[Constraint], vocab: int) -> torch.Tensor:
    """(R, ceil(V / 32)) int32: each constraint's allowed next tokens (bit t of word t // 32)."""
    bitmask = torch.full((len(constraints), (vocab + 31) // 32), -1, dtype=torch.int32)
    for row, constraint in zip(bitmask, constraints):
        constraint.fill_mask(row)
    return bitmask


def _allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, V) bool from `_bitmasks` rows."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits).bool()


def _candidates(params, vocab: int) -> int | None:
    """The best logits a row's sampler looks at (None: all of them, or penalized ones)."""
    if params.has_penalties:
        return None
    if params.is_greedy:
        return 1
    if 0 < params.top_k <= min(MAX_CHECKED_CANDIDATES, vocab - 1):
        return params.top_k
    return None


def mask_rows(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """A copy of `logits` (B, V) with every constrained row's disallowed tokens at -inf (the rows
    without a constraint unchanged); `logits` itself unchanged (tests and tools; the sampler uses
    `masked_rows`)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    masked = logits.clone()
    allowed = _allowed(_bitmasks([constraints[i] for i in rows], logits.shape[1]), logits.shape[1])
    index = torch.tensor(rows)
    masked[index] = masked[index].masked_fill(~allowed, float("-inf"))
    return masked

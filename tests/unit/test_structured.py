"""Structured-output constraints: validation, the grammar's token masks, and the sampler applying
them to constrained rows only (the real Gemma tokenizer; no model)."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_dist.sampling import Sampler, SamplingParams, SamplingParamsError, SamplingRow, shard_candidates
from gemma_dist.structured import Constraint, grammar_of, grammar_tokenizer, mask_rows
from tests.helpers import default_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def lltokenizer(tokenizer):
    return grammar_tokenizer(tokenizer, tokenizer.vocab_size)


@pytest.mark.parametrize("fields, field", [
    ({"json_schema": "{"}, "json_schema"),
    ({"json_schema": "[1, 2]"}, "json_schema"),
    ({"json_schema": json.dumps({"type": "objectx"})}, "json_schema"),
    ({"json_schema": 3}, "json_schema"),
    ({"regex": "(a"}, "regex"),
    ({"choice": []}, "choice"),
    ({"choice": "yes"}, "choice"),
    ({"regex": "a", "json_schema": "{}"}, "regex"),
])
def test_constraints_that_do_not_compile_fail_naming_their_field(fields, field):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields)
    assert str(info.value).startswith(field)


def test_a_choice_constraint_steers_every_row_it_holds_and_no_other(tokenizer, lltokenizer):
    choices = ("yes", "no")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, tokenizer.vocab_size, generator=g)
    params = SamplingParams(temperature=0, choice=choices)
    constrained = [Constraint(params.grammar, lltokenizer) for _ in range(2)]
    rows = [SamplingRow(params, [2], [], constraint=constrained[0]),
            SamplingRow(SamplingParams(temperature=0), [2], []),
            SamplingRow(params, [2], [], constraint=constrained[1])]
    masked = mask_rows(logits, [r.constraint for r in rows])
    assert torch.equal(masked[1], logits[1])  # the free row is untouched
    allowed = (masked[0] > float("-inf")).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t]))
                           for t in allowed)
    texts = ["", "", ""]
    sampler = Sampler(seed=0)
    for _ in range(4):  # each step's logits are new noise; the masks keep the rows on a choice
        result = sampler(torch.randn(3, tokenizer.vocab_size, generator=g), rows)
        for i, token in enumerate(result.token_ids):
            rows[i].output_token_ids.append(token)
            if token not in (tokenizer.eos_id, tokenizer.end_of_turn_id):
                texts[i] += tokenizer.decode([token])
    assert texts[0] in choices and texts[2] in choices
    assert rows[0].output_token_ids[-1] in lltokenizer.eos_tokens  # once complete, only an end token


def test_json_constraint_replays_generated_tokens_and_ends_with_only_end_tokens(tokenizer, lltokenizer):
    grammar = grammar_of(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"], "additionalProperties": False}), None, None)
    done = tokenizer.encode('{"a": 12}', add_bos=False)
    constraint = Constraint(grammar, lltokenizer, generated=done)
    mask = torch.full(((tokenizer.vocab_size + 31) // 32,), -1, dtype=torch.int32)
    constraint.fill_mask(mask)
    bits = ((mask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: tokenizer.vocab_size]
    assert set(bits.nonzero().flatten().tolist()) <= set(lltokenizer.eos_tokens)


def test_constrained_rows_need_their_whole_vocabulary_row_under_tensor_parallelism(lltokenizer):
    """Decided from the parameters alone: ranks without the grammar state must agree with rank 0."""
    params = SamplingParams(temperature=0, regex="[0-9]+")
    assert shard_candidates(SamplingRow(params, [2], [])) is None  # a rank that does not sample
    assert shard_candidates(SamplingRow(params, [2], [], constraint=Constraint(params.grammar, lltokenizer))) is None
    assert shard_candidates(SamplingRow(SamplingParams(temperature=0), [2], [])) == 1


def test_skipping_the_mask_when_the_best_candidates_are_allowed_picks_what_the_mask_picks(tokenizer, lltokenizer):
    """The sampler masks a constrained row only when its best candidates include a disallowed
    token; either way it must pick exactly what sampling from the fully masked row picks."""
    story = grammar_of(json.dumps({"type": "object", "properties": {"story": {"type": "string"}}}), None, None)
    digits = grammar_of(None, "[0-9]{1,8}", None)
    prefix = tokenizer.encode('{"story": "Once upon', add_bos=False)
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=40),
             SamplingParams(temperature=0.8, top_k=0, top_p=0.9), SamplingParams(temperature=0, presence_penalty=1.0)]
    g = torch.Generator().manual_seed(1)
    for trial in range(6):
        logits = torch.randn(8, tokenizer.vocab_size, generator=g) * 4
        if trial % 2:  # make the free text's best tokens likely: the mask then is mostly skipped
            logits[:, tokenizer.encode(" a time there", add_bos=False)] += 30
        fast_rows = rows_in_states(story, digits, prefix, kinds, lltokenizer, with_state=True)
        reference_rows = rows_in_states(story, digits, prefix, kinds, lltokenizer, with_state=False)
        masked = mask_rows(logits, [c for _, c in reference_rows])
        fast = Sampler(seed=trial)(logits, [r for r, _ in fast_rows])
        reference = Sampler(seed=trial)(masked, [r for r, _ in reference_rows])
        assert fast.token_ids == reference.token_ids


def rows_in_states(story, digits, prefix, kinds, lltokenizer, with_state: bool):
    """8 (row, constraint) pairs: odd rows inside a JSON string, even rows at a digit regex's start;
    the rows carry their constraint only `with_state` (the reference samples pre-masked logits)."""
    out = []
    for i in range(8):
        grammar, done = (story, prefix) if i % 2 else (digits, [])
        constraint = Constraint(grammar, lltokenizer, done)
        out.append((SamplingRow(kinds[i % 4], [2], list(done), constraint=constraint if with_state else None),
                    constraint))
    return out

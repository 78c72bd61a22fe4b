"""The real Gemma 3 270M: greedy output equals transformers' token for token.

The golden file comes from scripts/make_reference.py (transformers reading the same GGUF). Each
case is compared up to its first near-tie (a step whose reference top-1 margin is so small that
any correct fp32 implementation may pick the runner-up there; tests/helpers.py `stable_prefix`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemma_dist import SamplingParams
from tests.helpers import GOLDEN_MARGIN, MIN_STABLE_TOKENS, stable_prefix

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())
CASES = GOLDEN["cases"]


def test_golden_covers_the_required_prompts():
    kinds = {c["kind"] for c in CASES}
    assert {"prose", "code", "non_english", "chat", "digits", "long_over_window"} <= kinds
    long = next(c for c in CASES if c["kind"] == "long_over_window")
    assert len(long["prompt_token_ids"]) > 512  # longer than the sliding window
    assert all(len(c["output_token_ids"]) >= 32 for c in CASES)
    assert all(len(c["output_margins"]) == len(c["output_token_ids"]) for c in CASES)
    # Every case keeps enough tokens before its first near-tie to mean something.
    assert {c["kind"]: len(stable_prefix(c)) >= MIN_STABLE_TOKENS for c in CASES} == {c["kind"]: True for c in CASES}
    assert sum(len(stable_prefix(c)) for c in CASES) >= 0.75 * sum(len(c["output_token_ids"]) for c in CASES)


def test_our_margins_agree_with_the_reference(default_llm):
    """Teacher-forced on the reference tokens, our fp32 top-1 margins equal the recorded ones far
    more closely than GOLDEN_MARGIN (the bound stable_prefix trusts): measured <= 1.1e-4."""
    from tests.helpers import teacher_forced_logits, top1_margins

    for case in CASES[:2]:
        logits = teacher_forced_logits(default_llm.model, case["prompt_token_ids"], case["output_token_ids"])
        ours = top1_margins(logits)
        assert (ours - torch.tensor(case["output_margins"])).abs().max() < GOLDEN_MARGIN / 10, case["kind"]
        stable = stable_prefix(case)
        assert logits.argmax(-1)[: len(stable)].tolist() == stable, case["kind"]


@pytest.mark.parametrize("case", CASES, ids=[c["kind"] for c in CASES])
def test_tokenizer_matches_reference_prompt_ids(default_llm, case):
    assert default_llm.tokenizer.encode(case["prompt"]) == case["prompt_token_ids"]


def test_greedy_matches_transformers_batched(default_llm):
    """All prompts in one generate call (one batch) give the reference's tokens."""
    params = [SamplingParams(temperature=0, max_tokens=len(c["output_token_ids"])) for c in CASES]
    outputs = default_llm.generate([c["prompt_token_ids"] for c in CASES], params)
    for case, out in zip(CASES, outputs):
        stable = stable_prefix(case)
        assert out.token_ids[: len(stable)] == stable, case["kind"]


@pytest.mark.parametrize("case", CASES[:2], ids=[c["kind"] for c in CASES[:2]])
def test_greedy_matches_transformers_alone(default_llm, case):
    params = SamplingParams(temperature=0, max_tokens=len(case["output_token_ids"]))
    out = default_llm.generate(case["prompt"], params)[0]
    stable = stable_prefix(case)
    assert out.token_ids[: len(stable)] == stable
    assert out.text == default_llm.tokenizer.decode(out.token_ids)

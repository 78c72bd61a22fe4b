"""The real Gemma 3 270M: greedy output equals transformers' token for token.

The golden file comes from scripts/make_reference.py (transformers reading the same GGUF).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma_dist import SamplingParams

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())
CASES = GOLDEN["cases"]


def test_golden_covers_the_required_prompts():
    kinds = {c["kind"] for c in CASES}
    assert {"prose", "code", "non_english", "chat", "digits", "long_over_window"} <= kinds
    long = next(c for c in CASES if c["kind"] == "long_over_window")
    assert len(long["prompt_token_ids"]) > 512  # longer than the sliding window
    assert all(len(c["output_token_ids"]) >= 32 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["kind"] for c in CASES])
def test_tokenizer_matches_reference_prompt_ids(default_llm, case):
    assert default_llm.tokenizer.encode(case["prompt"]) == case["prompt_token_ids"]


def test_greedy_matches_transformers_batched(default_llm):
    """All prompts in one generate call (one batch) give the reference's tokens."""
    params = [SamplingParams(temperature=0, max_tokens=len(c["output_token_ids"])) for c in CASES]
    outputs = default_llm.generate([c["prompt_token_ids"] for c in CASES], params)
    for case, out in zip(CASES, outputs):
        assert out.token_ids == case["output_token_ids"], case["kind"]


@pytest.mark.parametrize("case", CASES[:2], ids=[c["kind"] for c in CASES[:2]])
def test_greedy_matches_transformers_alone(default_llm, case):
    params = SamplingParams(temperature=0, max_tokens=len(case["output_token_ids"]))
    out = default_llm.generate(case["prompt"], params)[0]
    assert out.token_ids == case["output_token_ids"]
    assert out.text == default_llm.tokenizer.decode(case["output_token_ids"])

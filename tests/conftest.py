"""Session-wide fixtures: the real Gemma 3 270M is loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_llm():
    """The offline LLM on the real default model (Gemma 3 270M), fp32."""
    from gemma_dist import LLM

    return LLM(model="default", dtype="float32")

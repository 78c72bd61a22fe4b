"""The int8 mode (layers.Int8Blocks over the native q8_gemm kernel).

Weights and activations are int8 with one scale per block of _Q8_BLOCK values along the
reduction (fp32 for activations, fp16 for weights); the block sums are exact integers. The kernel
must compute exactly that arithmetic (checked against a float64 reference of the same quantized
operands), give each row the same bits whatever shares its call or however many threads run, and
the int8 model must follow the exact model wherever the reference's choice is clear.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.model import layers
from gemma_dist.model.layers import Int8Blocks, VocabParallelEmbedding, set_cpu_kernels
from gemma_dist.model.native import NativeUnavailable, cpu_has_avx2

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="the int8 kernel needs an x86-64 CPU with AVX2 + FMA")
BLOCK = layers._Q8_BLOCK


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and block: scale = max|x| / 127, codes = x * (127 / max|x|) rounded to nearest, ties to even."""
    rows, width = x.shape
    blocks = x.reshape(rows, width // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv)  # ties to even
    return codes.clamp(-127, 127).to(torch.int8).reshape(rows, width), (amax / 127.0).squeeze(2)


def reference_quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and block: scale = max|w| / 127 rounded to fp16, codes = w / that scale rounded to
    nearest (ties to even) within [-127, 127], in float64 from the fp16 scale."""
    rows, width = w.shape
    blocks = w.double().reshape(rows, width // block, block)
    scale = (w.reshape(rows, width // block, block).abs().amax(dim=2) / 127.0).half()
    s = scale.double()[..., None]
    codes = torch.where(s > 0, blocks / s, torch.zeros((), dtype=torch.float64))
    return torch.round(codes).clamp(-127, 127).to(torch.int8).reshape(rows, width), scale


def reference_product(x: torch.Tensor, w: torch.Tensor, weight_block: int = BLOCK) -> torch.Tensor:
    """sum over activation blocks of x_scale * (its weight block's) w_scale * (int dot of the codes), in float64."""
    xq, xd = reference_quantize(layers._pad_to_blocks(x))
    wq, wd = reference_quantize_weight(layers._pad_to_blocks(w), weight_block)
    rows, width = xq.shape
    xb = xq.double().reshape(rows, -1, BLOCK)
    wb = wq.double().reshape(w.shape[0], -1, BLOCK)
    dots = torch.einsum("mbi,nbi->mnb", xb, wb)  # exact: integers far below 2**53
    w_scales = wd.double().repeat_interleave(weight_block // BLOCK, dim=1)  # each activation block's weight scale
    return (dots * xd.double()[:, None, :] * w_scales[None, :, :]).sum(dim=2)


def kernel_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's own activation quantizer (q8_quantize, as q8_linear runs it on x): codes, fp32 scales."""
    rows, width = x.shape
    q = torch.empty(rows, width, dtype=torch.int8)
    d = torch.empty(rows, width // BLOCK, dtype=torch.float32)
    layers._q8_library().q8_quantize(x.data_ptr(), rows, width, width, q.data_ptr(), d.data_ptr())
    return q, d


def test_activations_quantize_to_the_reference_codes_and_scales():
    torch.manual_seed(0)
    x = torch.randn(5, 6 * BLOCK)
    x[1, :BLOCK] = 0.0  # a zero block: scale 0, codes 0
    x[2, BLOCK: 2 * BLOCK] = torch.arange(BLOCK) - (BLOCK - 1) / 2  # exact halves: ties to even (scale 1)
    x[2, BLOCK] = 127.0
    q, d = kernel_quantize(x.contiguous())
    want_q, want_d = reference_quantize(x)
    assert torch.equal(q, want_q) and torch.equal(d, want_d.float())
    assert d[1, 0] == 0 and not q[1, :BLOCK].any()


def test_weights_quantize_to_fp16_scales_and_the_codes_of_those_scales():
    torch.manual_seed(1)
    w = torch.randn(9, 8 * BLOCK) * 0.05
    w[0, :BLOCK] = 0.0  # a zero block: scale 0, codes 0
    w[1, BLOCK: 2 * BLOCK] = 1e-3 * (torch.arange(BLOCK) - BLOCK // 2)  # max |w| / 127 is not an fp16 value
    w[2, 3] = 300.0  # an outlier: only its own block loses resolution
    q, d = layers._q8_quantize_weight(w, rows_per_pass=4)  # several passes
    want_q, want_d = reference_quantize_weight(w)
    assert d.dtype == torch.float16 and torch.equal(d, want_d)
    assert torch.equal(q, want_q) and q.abs().max() <= 127
    assert d[0, 0] == 0 and not q[0, :BLOCK].any()
    # Each weight is within half a step of its block's (fp16) scale, clamping aside.
    error = (q.float() * d.float().repeat_interleave(BLOCK, dim=1) - w).abs()
    assert (error <= d.float().repeat_interleave(BLOCK, dim=1) * 0.51 + 1e-9).all()
    huge_q, huge_d = layers._q8_quantize_weight(torch.full((1, BLOCK), 1e9))  # beyond fp16's scales: saturates
    assert huge_d[0, 0] == 65504 and (huge_q == 127).all()


@pytest.mark.parametrize("weight_block", [BLOCK, layers._Q8_HEAD_BLOCK])
@pytest.mark.parametrize("rows,out,width", [(1, 64, 128), (7, 37, 96), (33, 130, 40)])  # 40: padded to blocks
def test_the_product_is_the_block_quantized_arithmetic(rows, out, width, weight_block):
    torch.manual_seed(rows)
    w, x = torch.randn(out, width) * 0.05, torch.randn(rows, width)
    x[:, 3] *= 40  # an outlier channel: only its own blocks lose resolution
    w[:, 20] *= 30  # an outlier weight column: only its own weight blocks lose resolution
    with torch.inference_mode():
        got = Int8Blocks.of(w, weight_block)(x)
    want = reference_product(x, w, weight_block)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # fp32 sums of exact block dots


def test_a_q8_0_tensor_quantizes_back_to_its_own_codes_and_scales_in_head_blocks():
    """GGUF's Q8_0 (the default checkpoint's tied embedding): int8 codes with one fp16 scale per 32
    values, the largest code of a block +-127. Dequantized, the LM head's blocks recover both exactly."""
    torch.manual_seed(5)
    codes = torch.randint(-127, 128, (6, 4 * 32), dtype=torch.int8)
    codes.view(6, 4, 32)[:, :, 7] = 127 * torch.where(torch.rand(6, 4) < 0.5, -1, 1).to(torch.int8)
    scales = (torch.rand(6, 4) * 1e-2 + 1e-4).half()
    dequantized = codes.float() * scales.float().repeat_interleave(32, dim=1)
    q, d = layers._q8_quantize_weight(dequantized, layers._Q8_HEAD_BLOCK)
    assert torch.equal(q, codes) and torch.equal(d, scales)


@pytest.mark.parametrize("weight_block", [BLOCK, layers._Q8_HEAD_BLOCK])
def test_rows_do_not_depend_on_their_batch_or_the_thread_count(weight_block):
    torch.manual_seed(3)
    w, x = torch.randn(1030, 256) * 0.05, torch.randn(37, 256)
    kernel = Int8Blocks.of(w, weight_block)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        batch = kernel(x)
        alone = torch.cat([kernel(x[i: i + 1]) for i in range(len(x))])
        beside_huge = kernel(torch.cat([x, 1000 * x]))[: len(x)]
        torch.set_num_threads(1)
        try:
            one_thread = kernel(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(batch, alone) and torch.equal(batch, beside_huge) and torch.equal(batch, one_thread)


def test_int8_mode_covers_every_parallel_layer_including_a_narrow_lm_head():
    embed = VocabParallelEmbedding(1000, 64, layers.ParallelContext())
    assert set_cpu_kernels(embed, quantize="int8") == 1 and isinstance(embed.cpu_kernel, Int8Blocks)
    assert embed.cpu_kernel.scales.shape == (1000, 64 // layers._Q8_HEAD_BLOCK)  # the head's blocks
    assert set_cpu_kernels(embed) == 0 and embed.cpu_kernel is None  # back to fp32 (narrow: no packed kernel)


def test_a_missing_compiler_fails_loudly(monkeypatch, tmp_path):
    from gemma_dist.model import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GEMMA_DIST_CACHE", str(tmp_path))
    native.load.cache_clear()
    try:
        with pytest.raises(NativeUnavailable, match="no C compiler"):
            native.load("q8_gemm", (("QB", str(BLOCK)),))
    finally:
        native.load.cache_clear()


def test_quantize_is_refused_off_cpu():
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine

    with pytest.raises(ValueError, match="quantize"):
        EngineConfig(quantize="int4")
    with pytest.raises(ValueError, match="CPU mode"):
        LLMEngine.from_model("default", config=EngineConfig(quantize="int8"), device="xla")


@pytest.mark.slow
def test_int8_follows_the_exact_model_wherever_its_choice_is_clear(default_llm):
    """The real Gemma 3 270M teacher-forced over 256 tokens of prose, exact and int8: int8 moves
    logits by up to a few units, so it may pick the runner-up where the exact model's top-1 margin
    is small (measured: every disagreement below 0.76), never where that margin exceeds 2."""
    from pathlib import Path

    from tests.helpers import teacher_forced_logits, top1_margins

    model, tokenizer = default_llm.model, default_llm.tokenizer
    text = (Path(__file__).parent.parent.parent / "bench/data/public_domain_prose.txt").read_text()
    ids = tokenizer.encode(text, add_bos=False)[:255]
    exact = teacher_forced_logits(model, [tokenizer.bos_id], ids)
    try:
        assert set_cpu_kernels(model, quantize="int8") == 4 * model.config.num_layers + 1
        int8 = teacher_forced_logits(model, [tokenizer.bos_id], ids)
    finally:
        set_cpu_kernels(model)  # the session's other tests expect the exact prepacked model
    clear = top1_margins(exact) > 2.0
    agree = int8.argmax(-1) == exact.argmax(-1)
    assert int(clear.sum()) >= 100 and bool(agree[clear].all())
    assert agree.float().mean() >= 0.9  # bench/bench_quality.py: 97% over 19,095 tokens

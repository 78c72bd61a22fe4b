"""The native RMSNorm (gemma_dist/model/native/rms_norm.c behind layers.RMSNorm on fp32 CPU input).

It must compute Gemma's norm, (x / rms(x)) * (1 + w), to fp32 rounding of the torch form (its sum
of squares runs in its own order), read strided q/k views in place, give each row the same bits
whatever shares the call or however many threads run, and leave other inputs to the torch form.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.model import layers
from gemma_dist.model.layers import RMSNorm
from gemma_dist.model.native import cpu_has_avx2

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="the native RMSNorm needs an x86-64 CPU with AVX2 + FMA")


def torch_form(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The reference: the norm in float64, rounded to fp32 at the end."""
    x64 = x.double()
    inverse_rms = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (x64 * inverse_rms * (1.0 + norm.weight.double())).float()


def norm_of(dim: int, seed: int = 0) -> RMSNorm:
    torch.manual_seed(seed)
    norm = RMSNorm(dim, 1e-6)
    torch.nn.init.normal_(norm.weight, std=0.5)
    return norm


@pytest.mark.parametrize("shape", [(1, 640), (7, 37), (300, 64), (4096, 640), (2, 5)])
def test_native_norm_is_gemmas_norm_to_fp32_rounding(shape):
    norm = norm_of(shape[-1])
    x = torch.randn(shape) * 3.0
    with torch.inference_mode():
        assert layers._native_norm_applies(x)
        y = norm(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y, torch_form(norm, x), rtol=3e-6, atol=1e-6)


def test_native_norm_reads_strided_q_and_k_views_in_place():
    """q and k come from the fused QKV projection's output as (T, heads, D) views with a row stride
    wider than heads * D."""
    norm = norm_of(32, seed=1)
    fused = torch.randn(9, 6 * 32)
    q, k = fused[:, :4 * 32].view(9, 4, 32), fused[:, 4 * 32:5 * 32].view(9, 1, 32)
    assert not q.is_contiguous()
    with torch.inference_mode():
        assert layers._native_norm_applies(q)
        got_q, got_k = norm(q), norm(k)
    torch.testing.assert_close(got_q, torch_form(norm, q), rtol=3e-6, atol=1e-6)
    torch.testing.assert_close(got_k, torch_form(norm, k), rtol=3e-6, atol=1e-6)


def test_native_norm_is_batch_and_thread_invariant():
    norm = norm_of(640, seed=2)
    x = torch.randn(4096, 640)
    previous = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = norm(x)
            torch.set_num_threads(2)
            two = norm(x)
            alone = [norm(x[i:i + 1]) for i in (0, 17, 4095)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    for j, i in enumerate((0, 17, 4095)):
        assert torch.equal(alone[j], two[i:i + 1])


def test_other_inputs_keep_the_torch_form_and_a_changed_weight_is_seen():
    norm = norm_of(16, seed=3)
    x = torch.randn(4, 16)
    assert not layers._native_norm_applies(x.t().contiguous().t())  # last dim strided
    assert not layers._native_norm_applies(torch.randn(2, 3, 4, 16))  # 4 dims
    with torch.enable_grad():
        assert not layers._native_norm_applies(x)
    bf16 = norm(x.bfloat16())  # bf16: the torch form, back in bf16
    assert bf16.dtype == torch.bfloat16
    with torch.inference_mode():
        before = norm(x)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # in place (a new version): (1 + w) is rebuilt
    with torch.inference_mode():
        after = norm(x)
    torch.testing.assert_close(after, torch_form(norm, x), rtol=3e-6, atol=1e-6)
    assert not torch.equal(before, after)


def separate_ops(x: torch.Tensor, h: torch.Tensor, post: RMSNorm | None, pre: RMSNorm):
    """The residual step as three ops: the (native) post-norm, the add, the (native) pre-norm."""
    total = x + (h if post is None else post(h))
    return total, pre(total)


@pytest.mark.parametrize("rows,dim", [(1, 640), (7, 37), (300, 64), (4096, 640)])
@pytest.mark.parametrize("sandwich", [True, False])
def test_fused_residual_step_is_bitwise_the_separate_norm_add_and_norm(rows, dim, sandwich):
    post, pre = (norm_of(dim, 1) if sandwich else None), norm_of(dim, 2)
    x, h = torch.randn(rows, dim) * 3.0, torch.randn(rows, dim) * 50.0
    with torch.inference_mode():
        total, normed = layers.residual_norm(x, h, post, pre)
        want_total, want_normed = separate_ops(x, h, post, pre)
    assert torch.equal(total, want_total) and torch.equal(normed, want_normed)
    assert total.data_ptr() != x.data_ptr()  # x is read, never overwritten


def test_fused_residual_rows_are_batch_and_thread_invariant():
    post, pre = norm_of(640, 3), norm_of(640, 4)
    x, h = torch.randn(2048, 640), torch.randn(2048, 640) * 20.0
    with torch.inference_mode():
        whole = layers.residual_norm(x, h, post, pre)
        alone = layers.residual_norm(x[5:6].clone(), h[5:6].clone(), post, pre)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_thread = layers.residual_norm(x, h, post, pre)
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(whole[0][5:6], alone[0]) and torch.equal(whole[1][5:6], alone[1])
    assert torch.equal(whole[0], one_thread[0]) and torch.equal(whole[1], one_thread[1])


def test_residual_step_off_the_native_path_is_the_same_ops():
    post, pre = norm_of(16, 5), norm_of(16, 6)
    x, h = torch.randn(3, 16), torch.randn(3, 16)
    with torch.enable_grad():  # autograd on: the torch form
        total, normed = layers.residual_norm(x, h, post, pre)
    with torch.inference_mode():
        want_total, want_normed = separate_ops(x, h, post, pre)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)
    bf16 = layers.residual_norm(x.bfloat16(), h.bfloat16(), post, pre)
    assert bf16[0].dtype == bf16[1].dtype == torch.bfloat16

"""The native RoPE (gemma_dist/model/native/rope.c behind layers.apply_rope on fp32 CPU input).

It makes the same three roundings as the torch form in the same order (no fused multiply-add), so
its output must be bitwise the torch form's, reading q/k views of the fused QKV output in place.
"""

from __future__ import annotations

import pytest
import torch

from gemma_dist.model import layers
from gemma_dist.model.native import cpu_has_avx2

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="the native RoPE needs an x86-64 CPU with AVX2 + FMA")


def torch_form(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return (x * cos).add_(swapped.mul_(signed_sin))


@pytest.mark.parametrize("tokens,heads,dim", [(1, 4, 256), (7, 1, 16), (300, 8, 128), (5, 3, 10), (4096, 4, 64)])
def test_native_rope_is_bitwise_the_torch_form_on_strided_views(tokens, heads, dim):
    torch.manual_seed(tokens + dim)
    fused = torch.randn(tokens, (heads + 2) * dim) * 4.0
    x = fused[:, dim:(heads + 1) * dim].view(tokens, heads, dim)  # a k-like view: offset and strided rows
    cos, signed_sin = layers.rope_cos_sin(torch.randint(0, 30_000, (tokens,)), dim, 10_000.0, 1.0, torch.float32)
    with torch.inference_mode():
        assert layers._native_rope_applies(x, cos, signed_sin)
        got = layers.apply_rope(x, cos, signed_sin)
        want = torch_form(x, cos, signed_sin)
    assert got.is_contiguous() and torch.equal(got, want)


def test_other_inputs_keep_the_torch_form():
    x = torch.randn(3, 2, 8)
    cos, signed_sin = layers.rope_cos_sin(torch.arange(3), 8, 10_000.0, 1.0, torch.float32)
    with torch.inference_mode():
        assert not layers._native_rope_applies(x.transpose(1, 2), cos, signed_sin)  # D strided
        assert not layers._native_rope_applies(x, cos.bfloat16(), signed_sin.bfloat16())
        assert not layers._native_rope_applies(x[:2], cos, signed_sin)  # tables of other tokens
    with torch.enable_grad():
        assert not layers._native_rope_applies(x, cos, signed_sin)
    assert layers.apply_rope(x.bfloat16(), cos.bfloat16(), signed_sin.bfloat16()).dtype == torch.bfloat16

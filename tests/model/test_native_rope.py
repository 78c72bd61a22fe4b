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


def separate_prologue(qkv, heads, kv_heads, head_dim, q_norm, k_norm, cos, signed_sin, k_cache, v_cache, slots):
    """The ops the prologue replaces: split, the (native) q/k norms, the (native) RoPE, the cache copies."""
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(-1, heads, head_dim), k.reshape(-1, kv_heads, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = layers.apply_rope(q, cos, signed_sin), layers.apply_rope(k, cos, signed_sin)
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.reshape(-1, kv_heads, head_dim))
    return q


def norms(head_dim: int, seed: int):
    torch.manual_seed(seed)
    q_norm, k_norm = layers.RMSNorm(head_dim, 1e-6), layers.RMSNorm(head_dim, 1e-6)
    torch.nn.init.normal_(q_norm.weight, std=0.5)
    torch.nn.init.normal_(k_norm.weight, std=0.5)
    return q_norm, k_norm


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 1, 256), (9, 4, 1, 16), (300, 8, 2, 128),
                                                            (5, 2, 2, 10)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_prologue_is_bitwise_the_separate_ops(tokens, heads, kv_heads, head_dim, qk_norm):
    torch.manual_seed(tokens * head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 4.0
    cos, signed_sin = layers.rope_cos_sin(torch.randint(0, 30_000, (tokens,)), head_dim, 10_000.0, 1.0, torch.float32)
    q_norm, k_norm = norms(head_dim, tokens) if qk_norm else (None, None)
    caches = [torch.randn(tokens + 7, 4, kv_heads, head_dim) for _ in range(2)]  # (pages, block_size, Hkv, D)
    caches += [cache.clone() for cache in caches]
    slots = torch.randperm(caches[0].shape[0] * 4)[:tokens]  # scattered, as pages from a pool are
    with torch.inference_mode():
        got = layers.native_attention_prologue(qkv, heads, kv_heads, q_norm, k_norm, cos, signed_sin, caches[0],
                                               caches[1], slots)
        want = separate_prologue(qkv, heads, kv_heads, head_dim, q_norm, k_norm, cos, signed_sin, caches[2],
                                 caches[3], slots)
    assert got is not None and torch.equal(got, want)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])  # the same slots, the same bits


def test_attention_prologue_refuses_a_slot_outside_the_cache_and_writes_nothing():
    qkv = torch.randn(2, 3 * 16)
    cos, signed_sin = layers.rope_cos_sin(torch.arange(2), 16, 10_000.0, 1.0, torch.float32)
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the cache"):
        layers.native_attention_prologue(qkv, 1, 1, None, None, cos, signed_sin, k_cache, v_cache,
                                         torch.tensor([3, 8]))
    assert not k_cache.any() and not v_cache.any()


def test_attention_prologue_leaves_other_inputs_to_the_ops():
    qkv = torch.randn(2, 3 * 16)
    cos, signed_sin = layers.rope_cos_sin(torch.arange(2), 16, 10_000.0, 1.0, torch.float32)
    caches = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    slots = torch.tensor([0, 5])
    with torch.inference_mode():
        assert layers.native_attention_prologue(qkv.bfloat16(), 1, 1, None, None, cos, signed_sin, *caches,
                                                slots) is None
        assert layers.native_attention_prologue(qkv[:, :40], 1, 1, None, None, cos, signed_sin, *caches,
                                                slots) is None  # not the fused width
        assert layers.native_attention_prologue(qkv, 1, 1, None, None, cos, signed_sin, *caches,
                                                slots.int()) is None
    with torch.enable_grad():
        assert layers.native_attention_prologue(qkv, 1, 1, None, None, cos, signed_sin, *caches, slots) is None

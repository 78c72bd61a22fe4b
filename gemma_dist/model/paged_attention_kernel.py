"""A fused paged-attention kernel (Triton) that reads K/V straight from the paged cache.

The gather path (`layers.paged_attention`) copies each sequence's keys out of the cache into a
padded batch and masks it; this kernel instead walks the block table: one program per (query
token, query head) loads one cache block of keys at a time, and keeps an online softmax in
fp32, so memory traffic is one read of the keys the token may see (only the sliding window's
blocks on local layers). Query tokens of decode and prefill steps alike, GQA/MQA, Gemma 2
logit softcapping and sliding windows are handled. Shapes depend only on the token count and
the block-table width, so a decode step that uses it can be captured in a CUDA graph.

It runs compiled on CUDA; CPU tests run the same kernel through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma_dist.model.attention import KernelInputs


@triton.jit(do_not_specialize=["stride_bt", "window"])  # step-dependent ints: no recompiles per value
def _paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, seq_ptr, tables_ptr, pos_ptr,
                     stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh,
                     stride_bt, scale, softcap, window,
                     GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    pos = tl.load(pos_ptr + token)
    seq = tl.load(seq_ptr + token)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + token * stride_qt + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    first = 0
    if USE_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
    offsets = tl.arange(0, BLOCK_SIZE)
    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(first // BLOCK_SIZE, pos // BLOCK_SIZE + 1):
        physical = tl.load(tables_ptr + seq * stride_bt + blk).to(tl.int64)
        rows = physical * stride_kb + offsets[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        key_pos = blk * BLOCK_SIZE + offsets
        valid = (key_pos <= pos) & (key_pos >= first)  # causal and inside the window
        load_mask = valid[:, None] & d_ok[None, :]  # keys it may not see are never read
        k = tl.load(k_ptr + rows, mask=load_mask, other=0.0).to(tl.float32)  # (BLOCK_SIZE, BLOCK_D)
        scores = tl.sum(k * q[None, :], axis=1) * scale  # (BLOCK_SIZE,)
        if USE_SOFTCAP:
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)  # softcap * tanh(s / softcap)
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + rows, mask=load_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_attention_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, inputs: KernelInputs,
                           local: bool, scale: float, softcap: float | None, group: int = 0) -> torch.Tensor:
    """q (T, Hq, D) over caches (num_pages, block_size, Hkv, D), through layer group `group`'s
    block tables → (T, Hq * D)."""
    tokens, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the paged-attention kernel needs contiguous caches of one layout and q with unit last stride")
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    window = inputs.sliding_window if local and inputs.sliding_window is not None else 0
    tables = inputs.block_tables[group]  # (B, W)
    _paged_attention[(tokens, heads)](
        q, k_cache, v_cache, out, inputs.token_seq, tables, inputs.positions,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), tables.stride(0),
        float(scale), float(softcap or 0.0), int(window),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), USE_SOFTCAP=softcap is not None, USE_WINDOW=window > 0)
    return out.view(tokens, heads * head_dim)

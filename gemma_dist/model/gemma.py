"""The one Gemma text model for the whole family (Gemma 1, 2 and 3).

Variants differ only by `ModelConfig` fields: softcapping, sliding-window layers, QK-norm,
sandwich norms, RoPE bases and scaling. The model is a pure function of token ids,
positions and the paged KV cache (no tokenizer, sampler or file paths inside); tensor
parallelism lives in the layer types it is built from (`layers.py`).

Shapes: T = tokens in the step (all sequences flattened), H = hidden size,
Hq / Hkv = this rank's query / key-value heads, D = head_dim.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gemma_dist.config import AttentionKind, ModelConfig
from gemma_dist.model.attention import AttentionMetadata, KVCache, write_kv
from gemma_dist.model.layers import (
    ColumnParallelLinear, ParallelContext, RMSNorm, RowParallelLinear, ShardSpec, VocabParallelEmbedding,
    apply_rope, gelu_tanh, native_attention_prologue, paged_attention, residual_norm, rope_cos_sin, split_evenly,
)


@functools.lru_cache(maxsize=None)
def _embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden) rounded to the activation dtype, as the reference does; a Python float, so
    the forward creates no tensor from host data (CUDA graph capture forbids that copy)."""
    return float(torch.tensor(hidden_size ** 0.5, dtype=dtype))


class GemmaAttention(nn.Module):
    """Multi-head / grouped-query attention with fused QKV, over the paged cache."""

    def __init__(self, config: ModelConfig, kind: AttentionKind, parallel: ParallelContext):
        super().__init__()
        self.kind = kind
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcap
        heads_per_rank = split_evenly(config.num_heads, parallel.size, "num_heads")
        # KV heads are split when there are enough; with fewer KV heads than ranks, each rank
        # keeps a copy of the one KV head its query heads read (Gemma 3 270M/1B and Gemma 1
        # 2B have a single KV head).
        d, r = config.head_dim, parallel.rank
        if config.num_kv_heads < parallel.size:
            if parallel.size % config.num_kv_heads:
                raise ValueError(f"tp size {parallel.size} must be a multiple of num_kv_heads "
                                 f"{config.num_kv_heads} when KV heads are replicated")
            kv_per_rank = 1
            kv_start = (r * config.num_kv_heads // parallel.size) * d
        else:
            kv_per_rank = split_evenly(config.num_kv_heads, parallel.size, "num_kv_heads")
            kv_start = r * kv_per_rank * d
        # Heads this process computes: its rank's, or every rank's side by side under SPMD
        # (replicated KV heads then appear once per rank, so each query head keeps its KV head).
        self.num_heads, self.num_kv_heads = heads_per_rank * parallel.held, kv_per_rank * parallel.held
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [
            ("q_proj", config.num_heads * d, heads_per_rank * d, r * heads_per_rank * d),
            ("k_proj", config.num_kv_heads * d, kv_per_rank * d, kv_start),
            ("v_proj", config.num_kv_heads * d, kv_per_rank * d, kv_start),
        ], held=parallel.held)
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size, parallel)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, group: int = 0) -> torch.Tensor:
        """(T, H) → (T, H): project, QK-norm, RoPE, write K/V to the cache (the pages of layer group
        `group`), attend, project out."""
        qkv = self.qkv_proj(x)
        slots = meta.slot_mapping[group]
        q = None
        if self.qkv_proj.held == 1:  # one native call on fp32 CPU; None elsewhere
            q = native_attention_prologue(qkv, self.num_heads, self.num_kv_heads, self.q_norm, self.k_norm, *rope,
                                          *cache, slots)
        if q is None:
            q = self._prologue(qkv, rope, cache, slots)
        out = paged_attention(q, cache[0], cache[1], meta, self.kind is AttentionKind.LOCAL,
                              self.scale, self.softcap, group)  # (T, Hq*D)
        return self.o_proj(out)

    def _prologue(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """qkv (T, fused width) → q (T, Hq, D): split, QK-norm, RoPE, and the new K/V written at `slots`."""
        q, k, v = self.qkv_proj.split_segments(qkv)
        q = q.reshape(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        write_kv(cache[0], cache[1], k, v, slots)
        return q


class GemmaMLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext):
        super().__init__()
        full = config.intermediate_size
        self.local = split_evenly(full, parallel.size, "intermediate_size")
        start = parallel.rank * self.local
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [("gate_proj", full, self.local, start), ("up_proj", full, self.local, start)],
            held=parallel.held)
        self.down_proj = RowParallelLinear(full, config.hidden_size, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) → (T, H)."""
        gate, up = self.gate_up_proj.split_segments(self.gate_up_proj(x))
        return self.down_proj(gelu_tanh(gate) * up)


class GemmaDecoderLayer(nn.Module):
    """Pre-norm attention + MLP; Gemma 2/3 add post-attention and post-feed-forward norms."""

    def __init__(self, config: ModelConfig, kind: AttentionKind, parallel: ParallelContext):
        super().__init__()
        self.kind = kind
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps)
        self.attn = GemmaAttention(config, kind, parallel)
        self.pre_ffw_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = GemmaMLP(config, parallel)
        sandwich = config.use_sandwich_norms
        self.post_attn_norm = RMSNorm(config.hidden_size, eps) if sandwich else None
        self.post_ffw_norm = RMSNorm(config.hidden_size, eps) if sandwich else None

    def forward(self, x: torch.Tensor, normed: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, group: int,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) residual stream x and its input norm `normed` → the new residual stream and
        next_norm of it (the next layer's input norm, or the final norm), both (T, H); each residual
        step fuses the sublayer's post-norm, the add and the next norm (`residual_norm`).
        `group`: the layer's KV group (its block tables)."""
        h = self.attn(normed, rope, cache, meta, group)
        x, normed = residual_norm(x, h, self.post_attn_norm, self.pre_ffw_norm)
        h = self.mlp(normed)
        return residual_norm(x, h, self.post_ffw_norm, next_norm)


class GemmaForCausalLM(nn.Module):
    """Token ids + positions + KV cache → hidden states; `compute_logits` applies the tied LM head."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelContext()
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, self.parallel)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, kind, self.parallel) for kind in config.layer_kinds)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def num_kv_heads_per_rank(self) -> int:
        """KV heads this rank's cache must hold (every rank's, side by side, under SPMD)."""
        return self.layers[0].attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """(T,) ids and positions → (T, H) final-normed hidden states; writes the new K/V."""
        x = self.embed(input_ids)
        x = x * _embedding_scale(self.config.hidden_size, x.dtype)
        ropes = self._rope_tables(positions, x.dtype)
        groups = getattr(kv_cache, "layer_group", None) or (0,) * len(self.layers)  # a plain list: one group
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        normed = self.layers[0].input_norm(x)
        for layer, cache, group, next_norm in zip(self.layers, kv_cache, groups, next_norms):
            x, normed = layer(x, normed, ropes[layer.kind], cache, meta, group, next_norm)
        return normed

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) → (N, vocab) fp32 logits, final softcap applied (vocab-parallel slice if not gather).
        `out`: a reusable (N, vocab_local) buffer for this rank's slice (see `lm_head`)."""
        logits = self.embed.logits(hidden, gather=gather, out=out).float()
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def best_logits(self, hidden: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) → this rank's largest final logit per row over ids below `limit` and its id (the
        lowest on ties), both (N,), without the (N, vocab) logits where it can (layers.lm_head_argmax)."""
        return self.embed.argmax(hidden, limit, self.config.final_logit_softcap)

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin per layer kind: GLOBAL uses rope_theta (+ linear scaling), LOCAL rope_theta_local."""
        c = self.config
        return {
            AttentionKind.GLOBAL: rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling_factor, dtype),
            AttentionKind.LOCAL: rope_cos_sin(positions, c.head_dim, c.rope_theta_local, 1.0, dtype),
        }

    def shard_specs(self) -> dict[str, ShardSpec]:
        """Canonical checkpoint tensor name → where this rank's slice of it goes.

        Canonical names (what every loader yields): embed.weight, final_norm.weight and
        layers.{i}.{input_norm,post_attn_norm,pre_ffw_norm,post_ffw_norm}.weight,
        layers.{i}.attn.{q,k,v,o}_proj.weight, layers.{i}.attn.{q,k}_norm.weight,
        layers.{i}.mlp.{gate,up,down}_proj.weight. Norm weights are w of (1 + w).
        """
        specs = dict(self.embed.shard_specs("embed.weight", "embed.weight"))
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                specs[name] = ShardSpec(name, tuple(param.shape))
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}"
            specs.update(layer.attn.qkv_proj.shard_specs(f"{p}.attn", f"{p}.attn.qkv_proj.weight"))
            specs.update(layer.attn.o_proj.shard_specs(f"{p}.attn.o_proj.weight", f"{p}.attn.o_proj.weight"))
            specs.update(layer.mlp.gate_up_proj.shard_specs(f"{p}.mlp", f"{p}.mlp.gate_up_proj.weight"))
            specs.update(layer.mlp.down_proj.shard_specs(f"{p}.mlp.down_proj.weight", f"{p}.mlp.down_proj.weight"))
        return specs

"""Shared test helpers: tiny random-weight Gemma checkpoints in Hugging Face layout, and a
minimal forward driver over the paged KV cache."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

VOCAB = 512


def tiny_hf_config(family: str, rope_scaling: bool = False):
    """A transformers config of each family, small enough for millisecond forwards.

    Gemma 1 has one KV head (MQA); Gemma 2 has softcapping and alternating sliding window;
    Gemma 3 has QK-norm, two RoPE bases and (optionally) linear RoPE scaling on global layers.
    """
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if family == "gemma1":
        return transformers.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1,
                                        hidden_activation="gelu_pytorch_tanh", **common)
    if family == "gemma2":
        return transformers.Gemma2Config(num_hidden_layers=4, num_key_value_heads=2, sliding_window=8,
                                         query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, **common)
    if family == "gemma3":
        full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0} if rope_scaling \
            else {"rope_type": "default", "rope_theta": 1_000_000.0}
        return transformers.Gemma3TextConfig(
            num_hidden_layers=7, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=24,
            rope_parameters={"full_attention": full,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            **common)
    raise ValueError(family)


def make_tiny_hf_checkpoint(family: str, directory: Path, rope_scaling: bool = False, seed: int = 0,
                            head_dim_scale: bool = False):
    """Save a random-weight transformers model (with non-trivial norm weights) to `directory`.

    head_dim_scale: query_pre_attn_scalar = head_dim, as GGUF (which has no such key) implies.
    """
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(family, rope_scaling)
    if head_dim_scale and family != "gemma1":
        config.query_pre_attn_scalar = config.head_dim
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def forward_chunks(model, kv_cache, block_table: list[int], token_ids: list[int], chunk: int,
                   block_size: int) -> torch.Tensor:
    """Feed one sequence through `model` `chunk` tokens at a time; logits (len, vocab) for all positions."""
    from gemma_dist.model.attention import build_attention_metadata, positions_of

    outs = []
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        meta = build_attention_metadata([len(piece)], [start], [block_table], block_size,
                                        model.config.sliding_window)
        hidden = model(torch.tensor(piece), positions_of([len(piece)], [start]), kv_cache, meta)
        outs.append(model.compute_logits(hidden))
    return torch.cat(outs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (servers under test bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

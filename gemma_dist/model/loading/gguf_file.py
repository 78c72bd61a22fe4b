"""GGUF (llama.cpp) checkpoints of Gemma, Gemma 2 and Gemma 3, read with the `gguf` package.

Quantized tensors (Q4_K, Q5_0, Q6_K, Q8_0, ...) are dequantized one at a time when read.
llama.cpp stores Gemma's RMSNorm weights as (1 + w); they are shifted back to w here so
every format hands the model the same canonical values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma_dist.config import VARIANTS, ConfigError, Family, ModelConfig, layer_pattern
from gemma_dist.model.loading.common import WeightLoadError, WeightSource
from gemma_dist.model.loading.hf_safetensors import matching_variant_name

_ARCH_FAMILY = {"gemma": Family.GEMMA1, "gemma2": Family.GEMMA2, "gemma3": Family.GEMMA3}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attn_norm.weight": "input_norm.weight",
    "post_attention_norm.weight": "post_attn_norm.weight",
    "ffn_norm.weight": "pre_ffw_norm.weight",
    "post_ffw_norm.weight": "post_ffw_norm.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight", "attn_output.weight": "attn.o_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.weight", "attn_k_norm.weight": "attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def open_reader(path: Path):
    """A gguf.GGUFReader, or WeightLoadError naming the file when it is missing or corrupt."""
    import gguf

    if not path.is_file():
        raise WeightLoadError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated files
        raise WeightLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:
        raise WeightLoadError(f"GGUF metadata {key} is unreadable ({e})") from e


def read_config(reader, path: Path, name: str | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.block_count, .embedding_length, ...)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_FAMILY:
        raise WeightLoadError(f"{path}: general.architecture {arch!r} is not a Gemma text model")
    family = _ARCH_FAMILY[arch]

    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise WeightLoadError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embed.shape[-1]) if embed is not None else len(tokens or [])
    kinds = {Family.GEMMA1: 0, Family.GEMMA2: 1, Family.GEMMA3: 5}[family]
    scaling = _field(reader, f"{arch}.rope.scaling.factor", 1.0) \
        if _field(reader, f"{arch}.rope.scaling.type") == "linear" else 1.0
    fields = dict(
        family=family, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        query_pre_attn_scalar=float(head_dim),  # GGUF has no field: the registry's value wins below
        attn_logit_softcap=_field(reader, f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=_field(reader, f"{arch}.final_logit_softcapping"),
        sliding_window=int(get("attention.sliding_window")) if kinds else None,
        layer_kinds=layer_pattern(layers, kinds), use_qk_norm=family is Family.GEMMA3,
        use_sandwich_norms=family is not Family.GEMMA1,
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        rope_theta_local=10_000.0, rope_scaling_factor=float(scaling))
    matched = matching_variant_name(fields)
    if matched in VARIANTS:  # e.g. the 27B models scale queries by hidden/heads, not head_dim
        fields["query_pre_attn_scalar"] = VARIANTS[matched].query_pre_attn_scalar
    name = name or matched
    try:
        return ModelConfig(name=name, **fields)
    except ConfigError as e:
        raise WeightLoadError(f"{path}: invalid Gemma metadata ({e})") from e


def canonical_name(gguf_name: str) -> str:
    """Canonical tensor name for a GGUF tensor name (unknown names pass through unchanged)."""
    if gguf_name == "token_embd.weight":
        return "embed.weight"
    if gguf_name == "output_norm.weight":
        return "final_norm.weight"
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return gguf_name


class GGUFSource(WeightSource):
    """Tensors of a GGUF file; each is dequantized to fp32 when read."""

    def __init__(self, reader, path: Path, family: Family):
        self.description = str(path)
        self.family = family
        self._tensors = {canonical_name(t.name): t for t in reader.tensors}

    def names(self) -> list[str]:
        """Canonical names of every tensor the checkpoint holds."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a tensor, without reading its data."""
        # GGUF lists dimensions fastest-first (ne0 = columns); torch wants rows first.
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor (dim=None) or its [start, stop) slice along `dim`."""
        import gguf

        tensor = self._tensors[name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise WeightLoadError(f"{self.description}: tensor {tensor.name} uses unsupported "
                                  f"quantization {tensor.tensor_type.name}") from e
        values = np.array(values, dtype=np.float32).reshape(self.shape(name))  # owned, writable
        if name.endswith("norm.weight"):
            values = values - 1.0  # llama.cpp stores 1 + w
        out = torch.from_numpy(values)
        if dim is not None:
            out = out.narrow(dim, start, stop - start)
        return out

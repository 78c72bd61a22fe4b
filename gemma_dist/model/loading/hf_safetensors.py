"""Hugging Face layout: config.json + model.safetensors (or shards listed in
model.safetensors.index.json), for Gemma, Gemma 2 and Gemma 3 (text or multimodal
checkpoints, whose vision tower is skipped)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gemma_dist.config import ConfigError, Family, ModelConfig, layer_pattern, VARIANTS
from gemma_dist.model.loading.common import WeightLoadError, WeightSource

# Prefixes of the text model in HF checkpoints (plain, and the two multimodal spellings).
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors of a multimodal checkpoint that are not part of the text model.
_NON_TEXT = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# HF per-layer tensor names → canonical ones. Gemma 1's "post_attention_layernorm" is the
# norm before the MLP; Gemma 2/3 use it after attention and add pre/post feed-forward norms.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# transformers' config-class defaults: published configs (e.g. google/gemma-3-4b-it's
# text_config) list only the fields that differ from them.
_HF_DEFAULTS: dict[Family, dict[str, Any]] = {
    Family.GEMMA1: dict(vocab_size=256_000, hidden_size=3072, intermediate_size=24_576, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10_000.0),
    Family.GEMMA2: dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                        rms_norm_eps=1e-6, rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    Family.GEMMA3: dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=256, sliding_window=4096),
}
_MODEL_TYPES = {"gemma": Family.GEMMA1, "gemma2": Family.GEMMA2, "gemma3_text": Family.GEMMA3,
                "gemma3": Family.GEMMA3}


def is_hf_dir(path: Path) -> bool:
    """A directory holding config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def read_config(path: Path, name: str | None = None) -> ModelConfig:
    """ModelConfig from an HF config.json (text_config of multimodal Gemma 3 is used)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{path / 'config.json'}: cannot read config ({e})") from e
    model_type = raw.get("model_type")
    if raw.get("tie_word_embeddings") is False or raw.get("text_config", {}).get("tie_word_embeddings") is False:
        raise WeightLoadError(f"{path / 'config.json'}: untied word embeddings are not a Gemma layout "
                              "(every Gemma ties the LM head to the embedding)")
    if model_type == "gemma3" and "text_config" in raw:
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in _MODEL_TYPES:
        raise WeightLoadError(f"{path / 'config.json'}: model_type {model_type!r} is not a Gemma text model")
    family = _MODEL_TYPES[model_type]
    try:
        return _config_from_hf({**_HF_DEFAULTS[family], **raw}, family, name)
    except (KeyError, TypeError, ConfigError) as e:
        raise WeightLoadError(f"{path / 'config.json'}: invalid Gemma config ({e})") from e


def _rope(raw: dict[str, Any], family: Family) -> tuple[float, float, float]:
    """(global theta, local theta, global linear scaling) from old- or new-style HF fields."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one entry per layer type
        full, sliding = params["full_attention"], params.get("sliding_attention", {})
        factor = full.get("factor", 1.0) if full.get("rope_type") == "linear" else 1.0
        return float(full["rope_theta"]), float(sliding.get("rope_theta", 10_000.0)), float(factor)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10_000.0)))
    scaling = raw.get("rope_scaling") or params
    factor = scaling.get("factor", 1.0) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    local = float(raw.get("rope_local_base_freq", 10_000.0 if family is Family.GEMMA3 else theta))
    return theta, local, float(factor)


def _config_from_hf(raw: dict[str, Any], family: Family, name: str | None) -> ModelConfig:
    layers = raw["num_hidden_layers"]
    if "layer_types" in raw and raw["layer_types"]:
        kinds = tuple("local" if t == "sliding_attention" else "global" for t in raw["layer_types"])
    elif family is Family.GEMMA1:
        kinds = layer_pattern(layers, 0)
    else:
        pattern = raw.get("sliding_window_pattern", 2 if family is Family.GEMMA2 else 6)
        kinds = layer_pattern(layers, pattern - 1)
    theta, local_theta, factor = _rope(raw, family)
    heads = raw["num_attention_heads"]
    fields = dict(
        family=family, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=layers, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar"),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        sliding_window=raw.get("sliding_window") if "local" in kinds else None,
        layer_kinds=kinds, use_qk_norm=family is Family.GEMMA3,
        use_sandwich_norms=family is not Family.GEMMA1,
        rope_theta=theta, rope_theta_local=local_theta, rope_scaling_factor=factor)
    return ModelConfig(name=name or matching_variant_name(fields), **fields)


def matching_variant_name(fields: dict[str, Any]) -> str:
    """The registry name whose architecture these fields describe, else 'custom'."""
    keys = ("family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
    for name, variant in VARIANTS.items():
        if all(getattr(variant, k) == fields[k] for k in keys):
            return name
    return "custom"


def canonical_name(hf_name: str, family: Family) -> str | None:
    """Canonical tensor name for an HF name; None for tensors outside the text model."""
    if _NON_TEXT.match(hf_name) or hf_name == "lm_head.weight":  # lm_head is tied to the embedding
        return None
    name = hf_name
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name == "embed_tokens.weight":
        return "embed.weight"
    if name == "norm.weight":
        return "final_norm.weight"
    match = _LAYER.match(name)
    if match:
        index, rest = match.groups()
        if rest == "post_attention_layernorm.weight":
            rest = "pre_ffw_norm.weight" if family is Family.GEMMA1 else "post_attn_norm.weight"
            return f"layers.{index}.{rest}"
        if rest in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[rest]}"
    return hf_name  # kept as-is: the strict loader reports it as unexpected


def hf_name(canonical: str, family: Family) -> str:
    """HF name of a canonical tensor (inverse of `canonical_name`, text-only layout)."""
    if canonical == "embed.weight":
        return "model.embed_tokens.weight"
    if canonical == "final_norm.weight":
        return "model.norm.weight"
    index, rest = _LAYER.match(canonical).groups()
    if rest == "pre_ffw_norm.weight" and family is Family.GEMMA1:
        return f"model.layers.{index}.post_attention_layernorm.weight"
    if rest == "post_attn_norm.weight":
        return f"model.layers.{index}.post_attention_layernorm.weight"
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    return f"model.layers.{index}.{inverse[rest]}"


class SafetensorsSource(WeightSource):
    """Tensors of one or more .safetensors files, read lazily (mmap) and sliced on read."""

    def __init__(self, path: Path, family: Family):
        self.description = str(path)
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[str, str]] = {}  # canonical → (file, hf name)
        for file in _safetensors_files(path):
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise WeightLoadError(f"{file}: not a readable safetensors file ({e})") from e
            self._files[str(file)] = handle
            for name in handle.keys():
                canonical = canonical_name(name, family)
                if canonical is not None:
                    self._where[canonical] = (str(file), name)

    def names(self) -> list[str]:
        """Canonical names of every tensor the checkpoint holds."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a tensor, without reading its data."""
        file, hf = self._where[name]
        return tuple(self._files[file].get_slice(hf).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor (dim=None) or its [start, stop) slice along `dim`."""
        file, hf = self._where[name]
        view = self._files[file].get_slice(hf)
        if dim is None:
            return view[:]
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return view[index]

    def close(self) -> None:
        """Release file handles."""
        self._files.clear()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise WeightLoadError(f"{index}: invalid safetensors index ({e})") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = [path / "model.safetensors"]
    for file in files:
        if not file.is_file():
            raise WeightLoadError(f"{file}: weight file not found")
    return files


def write_hf_config(config: ModelConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write an HF-compatible config.json describing `config` (used for converted caches)."""
    model_type = {Family.GEMMA1: "gemma", Family.GEMMA2: "gemma2", Family.GEMMA3: "gemma3_text"}[config.family]
    arch = {Family.GEMMA1: "GemmaForCausalLM", Family.GEMMA2: "Gemma2ForCausalLM",
            Family.GEMMA3: "Gemma3ForCausalLM"}[config.family]
    raw: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
        "rope_theta": config.rope_theta, "torch_dtype": "float32",
    }
    if config.family is not Family.GEMMA1:
        raw["sliding_window"] = config.sliding_window
        raw["layer_types"] = ["sliding_attention" if k.value == "local" else "full_attention"
                              for k in config.layer_kinds]
    if config.family is Family.GEMMA3:
        raw["rope_local_base_freq"] = config.rope_theta_local
        if config.rope_scaling_factor != 1.0:
            raw["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling_factor}
    raw.update(extra or {})
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(raw, indent=2))
    os.replace(tmp, path / "config.json")

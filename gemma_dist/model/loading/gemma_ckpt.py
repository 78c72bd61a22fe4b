"""gemma_pytorch checkpoints: a `.ckpt` (torch pickle) holding `model_state_dict`.

Its attention projection is one fused `qkv_proj` (rows: q, then k, then v), split here into
canonical q/k/v. The int8 `quant` format stores an int8 `weight` with a per-row
`weight_scaler`; reading dequantizes (weight * scaler[:, None]) only the rows asked for.
The file carries no config, so the architecture comes from `--variant` or is matched
against the registry by shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gemma_dist.config import Family, ModelConfig, VARIANTS, get_variant
from gemma_dist.model.loading.common import WeightLoadError, WeightSource

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# RoPE tables gemma_pytorch keeps as buffers: derived from the config, not weights.
_BUFFERS = {"freqs_cis", "local_freqs_cis", "global_freqs_cis"}
# Multimodal Gemma 3 checkpoints: the vision tower and projector are not part of the text model.
_NON_TEXT_PREFIXES = ("siglip_vision_model.", "mm_soft_embedding_norm.", "mm_input_projection.")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.query_norm.weight": "attn.q_norm.weight",
    "self_attn.key_norm.weight": "attn.k_norm.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `model_state_dict` of a gemma_pytorch checkpoint, memory-mapped."""
    if not path.is_file():
        raise WeightLoadError(f"{path}: checkpoint file not found")
    try:
        raw = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise WeightLoadError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path}: expected a dict with 'model_state_dict'")
    return state


def infer_config(state: dict[str, torch.Tensor], path: Path, variant: str | None) -> ModelConfig:
    """The registry variant named by `variant`, else the one whose shapes match the checkpoint."""
    if variant:
        return get_variant(variant)
    embed = state.get("embedder.weight", state.get("text_token_embedder.weight"))
    layers = len({m.group(1) for m in map(_LAYER.match, state) if m})
    has_qk_norm = any(k.endswith("query_norm.weight") for k in state)
    has_sandwich = any(k.endswith("pre_feedforward_layernorm.weight") for k in state)
    family = Family.GEMMA3 if has_qk_norm else Family.GEMMA2 if has_sandwich else Family.GEMMA1
    hidden = int(embed.shape[1]) if embed is not None else -1
    matches = [v for v in VARIANTS.values()
               if v.family is family and v.num_layers == layers and v.hidden_size == hidden]
    if len(matches) != 1:
        raise WeightLoadError(f"{path}: cannot infer the Gemma variant from the checkpoint "
                              f"({layers} layers, hidden {hidden}); pass variant=/--variant")
    return matches[0]


class GemmaCkptSource(WeightSource):
    """Canonical view of a gemma_pytorch state dict (fused qkv split, int8 dequantized)."""

    def __init__(self, state: dict[str, torch.Tensor], path: Path, config: ModelConfig):
        self.description = str(path)
        self._state = state
        q = config.num_heads * config.head_dim
        kv = config.num_kv_heads * config.head_dim
        # canonical → (ckpt name, first row, row count or None for all)
        self._where: dict[str, tuple[str, int, int | None]] = {}
        for name in state:
            if name.endswith("weight_scaler") or name in _BUFFERS or name.startswith(_NON_TEXT_PREFIXES):
                continue
            if name in ("embedder.weight", "text_token_embedder.weight"):
                self._where["embed.weight"] = (name, 0, None)
            elif name == "model.norm.weight":
                self._where["final_norm.weight"] = (name, 0, None)
            elif (m := _LAYER.match(name)) is not None:
                self._add_layer_tensor(name, int(m.group(1)), m.group(2), config, q, kv)
            else:
                self._where[name] = (name, 0, None)  # unexpected: reported by the strict loader

    def _add_layer_tensor(self, name: str, index: int, rest: str, config: ModelConfig, q: int, kv: int) -> None:
        prefix = f"layers.{index}"
        if rest == "self_attn.qkv_proj.weight":
            rows = self._state[name].shape[0]
            if rows != q + 2 * kv:
                raise WeightLoadError(f"{self.description}: tensor {name} has {rows} rows, "
                                      f"expected {q + 2 * kv} (q {q} + k {kv} + v {kv})")
            self._where[f"{prefix}.attn.q_proj.weight"] = (name, 0, q)
            self._where[f"{prefix}.attn.k_proj.weight"] = (name, q, kv)
            self._where[f"{prefix}.attn.v_proj.weight"] = (name, q + kv, kv)
        elif rest == "post_attention_layernorm.weight":
            canonical = "pre_ffw_norm.weight" if config.family is Family.GEMMA1 else "post_attn_norm.weight"
            self._where[f"{prefix}.{canonical}"] = (name, 0, None)
        elif rest in _LAYER_NAMES:
            self._where[f"{prefix}.{_LAYER_NAMES[rest]}"] = (name, 0, None)
        else:
            self._where[name] = (name, 0, None)

    def names(self) -> list[str]:
        """Canonical names of every tensor the checkpoint holds."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a tensor, without reading its data."""
        ckpt, _, rows = self._where[name]
        shape = tuple(self._state[ckpt].shape)
        return shape if rows is None else (rows, *shape[1:])

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor (dim=None) or its [start, stop) slice along `dim`."""
        ckpt, first, rows = self._where[name]
        tensor = self._state[ckpt]
        scaler = self._state.get(ckpt + "_scaler")
        if rows is not None:
            tensor = tensor.narrow(0, first, rows)
            scaler = scaler.narrow(0, first, rows) if scaler is not None else None
        if dim is not None:
            tensor = tensor.narrow(dim, start, stop - start)
            if scaler is not None and dim == 0:
                scaler = scaler.narrow(0, start, stop - start)
        if scaler is None:
            return tensor.float() if not tensor.is_floating_point() else tensor
        # int8 quant: per output row scale.
        return tensor.float() * scaler.float().unsqueeze(-1)

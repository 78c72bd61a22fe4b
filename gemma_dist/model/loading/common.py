"""Strict, shard-aware weight loading shared by every checkpoint format.

A format module turns its file into a `WeightSource`: canonical tensor names (see
`GemmaForCausalLM.shard_specs`), their full shapes, and a `read` that returns the whole
tensor or one rank's slice of it. `load_weights` then fills a model built on the meta
device, one tensor at a time, so peak memory is the model plus one tensor, never two
copies of the model. Anything missing, unexpected or mis-shaped is an error naming it.
"""

from __future__ import annotations

import abc
from typing import Iterable

import torch
from torch import nn

from gemma_dist.model.layers import ShardSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Show a progress bar when a checkpoint holds at least this many parameters.
PROGRESS_MIN_PARAMS = 500_000_000


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or tensor at fault."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a torch dtype) → torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise WeightLoadError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise WeightLoadError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    return DTYPES[dtype]


class WeightSource(abc.ABC):
    """Canonically named tensors of one checkpoint, readable whole or by slice."""

    description: str = "checkpoint"  # for error messages: the file path

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Canonical names of every tensor the checkpoint holds."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a tensor, without reading its data."""

    @abc.abstractmethod
    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor (dim=None) or its [start, stop) slice along `dim`, as a float tensor."""

    def close(self) -> None:
        """Release file handles."""


def _read_slice(source: WeightSource, name: str, spec: ShardSpec) -> torch.Tensor:
    """This rank's part of the tensor; shorter than asked (even empty) where a vocabulary
    shard overhangs the end of the vocabulary."""
    if spec.dim is None:
        return source.read(name)
    full = spec.full_shape[spec.dim]
    start, stop = min(spec.start, full), min(spec.stop, full)
    if start == stop:
        shape = list(spec.full_shape)
        shape[spec.dim] = 0
        return torch.empty(shape)
    return source.read(name, spec.dim, start, stop)


def load_weights(model: nn.Module, specs: dict[str, ShardSpec], source: WeightSource,
                 progress: bool | None = None, params: dict[str, torch.Tensor] | None = None) -> None:
    """Fill every parameter of `model` (already materialized with `to_empty`) from `source`.

    `params` overrides where each parameter name is written (SPMD: views of one rank's slice
    inside the stacked parameters). Strict: a checkpoint tensor with no spec is unexpected, a
    spec with no tensor is missing, and shapes must match exactly; all three raise
    WeightLoadError naming the tensor.
    """
    params = dict(model.named_parameters()) if params is None else params
    names = source.names()
    unexpected = sorted(set(names) - set(specs))
    if unexpected:
        raise WeightLoadError(f"{source.description}: unexpected tensor(s) {_few(unexpected)}")
    missing = sorted(set(specs) - set(names))
    if missing:
        raise WeightLoadError(f"{source.description}: missing tensor(s) {_few(missing)}")
    filled = {name: 0 for name in params}
    for name in _progress(names, source, progress):
        spec = specs[name]
        shape = tuple(source.shape(name))
        if shape != spec.full_shape:
            raise WeightLoadError(f"{source.description}: tensor {name} has shape {list(shape)}, "
                                  f"expected {list(spec.full_shape)}")
        part = _read_slice(source, name, spec)
        param = params[spec.param_name]
        with torch.no_grad():
            target = param.detach().narrow(0, spec.offset, part.shape[0])
            if target.shape != part.shape:
                raise WeightLoadError(f"{source.description}: tensor {name} slice {list(part.shape)} "
                                      f"does not fit parameter {spec.param_name} {list(param.shape)}")
            target.copy_(part.to(param.dtype))
            filled[spec.param_name] += part.numel()
            if spec.dim == 0 and spec.stop > spec.full_shape[0]:  # last vocabulary shard overhangs
                tail = param.detach()[spec.offset + part.shape[0]:]
                tail.zero_()
                filled[spec.param_name] += tail.numel()
    unfilled = [n for n, count in filled.items() if count != params[n].numel()]
    if unfilled:
        raise WeightLoadError(f"{source.description}: parameters left unfilled {_few(unfilled)}")


def _progress(names: list[str], source: WeightSource, progress: bool | None) -> Iterable[str]:
    if progress is None:
        total = sum(_numel(source.shape(n)) for n in names)
        progress = total >= PROGRESS_MIN_PARAMS
    if not progress:
        return names
    from tqdm import tqdm
    return tqdm(names, desc="Loading weights", unit="tensor")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _few(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

"""Building blocks of the Gemma model: norm, RoPE, paged attention, and the
tensor-parallel linear / embedding layers.

Tensor parallelism lives here and in weight loading, never in the model's forward:
each parallel layer owns only its rank's slice of the weight (tp=1 is the degenerate
case) and knows how to cut that slice out of the full checkpoint tensor
(`ShardSpec`). Collectives go through `ParallelContext`, a no-op at tp=1.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gemma_dist.model.attention import AttentionGroup, AttentionMetadata, KeyView

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parallelism


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group (rank 0 of 1 without parallelism)."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup when size > 1
    # SPMD (torch_xla): this one process holds all `size` shards side by side in each
    # parameter, laid out along the dim the ranks split (rank r's slice at offset r * slice);
    # the XLA compiler shards that dim over the device mesh and inserts the collectives.
    spmd: bool = False
    # CPU ranks of one host: a shared-memory group (gemma_dist.model.shm_group) that carries the fp32
    # all-reduces and small exchanges gloo would (about 1 ms a call over loopback TCP); None: gloo.
    local: object | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank must be in [0, {self.size}), got {self.rank}")
        if self.spmd and self.rank != 0:
            raise ValueError("an SPMD context holds every shard; its rank must be 0")

    @property
    def held(self) -> int:
        """Shards this process holds side by side: all of them under SPMD, else its own one."""
        return self.size if self.spmd else 1

    @property
    def communicates(self) -> bool:
        """True when this process must run collectives itself (torch.distributed, size > 1)."""
        return self.size > 1 and not self.spmd

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place (row-parallel outputs)."""
        if not self.communicates:
            return x
        if self.local is not None and self.local.sums(x):
            return self.local.all_reduce(x)
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank gets the first rank's `x` (in place; sampled token ids)."""
        if not self.communicates:
            return x
        if self.local is not None and self.local.fits(x):
            return x.copy_(self.local.all_gather(x)[0])
        torch.distributed.broadcast(x, src=torch.distributed.get_global_rank(self.group, 0), group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dim (vocab-parallel logits)."""
        if not self.communicates:
            return x
        x = x.contiguous()
        if self.local is not None and self.local.fits(x):
            return torch.cat(self.local.all_gather(x).unbind(0), dim=-1)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


def split_evenly(total: int, parts: int, what: str) -> int:
    """Size of one rank's share of `total`, which must divide evenly."""
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts})")
    return total // parts


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Where one checkpoint tensor lands inside a (possibly fused, possibly sharded) parameter.

    The checkpoint tensor has `full_shape`; this rank reads rows/columns
    [start, stop) along `dim` (dim=None: the whole tensor) and writes them into the
    parameter at `offset` along dim 0 (fused q/k/v and gate/up projections).
    """

    param_name: str
    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0
    offset: int = 0


# --------------------------------------------------------------------------- matmul

# CPU GEMM shapes. MKL runs a small-M product (a decode batch) x (M, K) @ W (N, K)^T up to
# ~2x faster when asked for (W @ x^T)^T, while large M (prefill) prefers the plain form. For
# M < 16 it runs matrix-vector kernels on ONE thread, leaving half the memory bandwidth of a
# 2-core machine unused, so big weights are split by output rows across a small thread pool.
#
# Batch invariance: a row's result should not depend on what else is in the batch.
# Fast mode (the default) pads 2..11 rows up to the next of 4, 8, 12: on the machine this was
# tuned on (MKL, AVX2) that makes rows bitwise identical for any M >= 2, but that is a property of
# the BLAS kernels, not a guarantee (another CPU or BLAS may pick other kernels for other M). A
# single row (one decoding sequence) keeps the fast matrix-vector kernel.
# Batch-invariant mode is structural: every CPU product runs in tiles of exactly _TILE_ROWS rows
# (the last tile zero-padded), one BLAS call of the same shape and form per tile, so a row is
# computed by the same kernel call whatever the batch size, on any CPU; what remains assumed is
# only that a GEMM computes each row of one call by itself (no reduction across rows, the same
# summation order for every row). Its cost (Gemma 3 270M, 2 cores): the four GEMMs of a layer take
# ~1.5 ms for one row (fast mode ~0.8 ms) and ~22 ms for 256 rows (~16 ms); the LM head is memory-bound,
# 16 rows cost what one does (~60 ms; fast mode's lone matrix-vector ~48 ms). Fast mode is unchanged.
_PADDED_ROWS = {2: 4, 3: 4, 5: 8, 6: 8, 7: 8, 9: 12, 10: 12, 11: 12}
_TILE_ROWS = 16  # small enough for decode steps; 32 would match one call at 256 rows, but cost ~40% more at 1
_batch_invariant = False


def set_batch_invariant(enabled: bool) -> None:
    """Make every row's result bitwise independent of the batch (fixed-size GEMM tiles on CPU)."""
    global _batch_invariant
    _batch_invariant = bool(enabled)


def _padded_rows(rows: int) -> int:
    """Rows to run a CPU product with: whole tiles in batch-invariant mode, else kernel-friendly sizes."""
    if _batch_invariant:
        return -(-rows // _TILE_ROWS) * _TILE_ROWS
    return _PADDED_ROWS.get(rows, rows)


_TRANSPOSED_M = (16, 384)
_SPLIT_MIN_BYTES = 32 << 20  # smaller weights lose more to thread hand-offs than they gain
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _row_split_matmul(x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T with the N output rows split across `threads` threads."""
    global _pool
    if _pool is None or _pool._max_workers != threads:
        _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gemma-gemv")
    bounds = [weight.shape[0] * i // threads for i in range(threads + 1)]
    jobs = [_pool.submit(_linear_in_inference_mode, x, weight[a:b]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat([job.result() for job in jobs], dim=1)


def _linear_in_inference_mode(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Inference mode is thread-local: a pool worker must enter it itself.
    with torch.inference_mode(torch.is_inference(x)):
        return F.linear(x, weight)


def _row_split_threads(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Threads to split a small-M CPU product over (0 = don't split)."""
    threads = torch.get_num_threads()
    if (threads < 2 or x.shape[0] >= _TRANSPOSED_M[0] or torch.is_grad_enabled()
            or weight.numel() * weight.element_size() < _SPLIT_MIN_BYTES):
        return 0
    return threads


def _tiles(x: torch.Tensor) -> list[torch.Tensor]:
    """x zero-padded to whole tiles of _TILE_ROWS rows, as a list of (_TILE_ROWS, K) views."""
    padded = _padded_rows(x.shape[0])
    if padded != x.shape[0]:
        x = F.pad(x, (0, 0, 0, padded - x.shape[0]))
    return list(x.split(_TILE_ROWS))


def _invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batch-invariant x @ weight^T: one (W @ tile^T) call of fixed shape (N, K) @ (K, _TILE_ROWS) per tile."""
    rows = x.shape[0]
    tiles = _tiles(x)
    out = torch.empty(len(tiles) * _TILE_ROWS, weight.shape[0], dtype=x.dtype)
    scratch = torch.empty(weight.shape[0], _TILE_ROWS, dtype=x.dtype)  # (N, tile)
    for i, tile in enumerate(tiles):
        torch.mm(weight, tile.t(), out=scratch)
        out[i * _TILE_ROWS: (i + 1) * _TILE_ROWS].copy_(scratch.t())
    return out[:rows]


def _invariant_lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batch-invariant LM head: per tile, the vocabulary split into one fixed slice per thread, each
    slice one plain (tile @ W_slice^T) call (memory-bound: 16 rows cost what 1 row costs)."""
    rows = x.shape[0]
    threads = torch.get_num_threads()
    parts = []
    for tile in _tiles(x):
        if threads >= 2 and not torch.is_grad_enabled():
            parts.append(_row_split_matmul(tile, weight, threads))
        else:  # the same slices, one after the other
            bounds = [weight.shape[0] * i // threads for i in range(threads + 1)]
            parts.append(torch.cat([F.linear(tile, weight[a:b]) for a, b in zip(bounds, bounds[1:])], dim=1))
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[:rows]


# CPU kernels. A layer may hold a `CpuKernel` built from its weight after loading (the runner
# does it: set_cpu_kernels); `linear` and `lm_head` use it where it applies.
#
# Prepacked fp32 (the exact mode's default): oneDNN with the weight reordered once into its blocked
# layout (what inductor's CPU weight freezing does) measured 1.2-3x faster than the MKL forms above
# on every Gemma 3 270M shape from M = 1 to 512 (LM head at M = 32: 58 against 154 ms; 2048x640 at
# M = 4: 0.07 against 0.26 ms), with fp32 rounding errors of the same size. The packed copy sits
# beside the plain weight (the embedding lookup, batch-invariant mode and other devices use that
# one), so it costs the layer's weight memory once more.
_PACK_ROWS_HINT = 32  # the M oneDNN tunes the layout for; any M runs
# A kernel's LM head allocates its (M, V) result: fresh pages every step (a 268 MB result at M = 256
# measured ~20 ms of page faults and unmapping per step). Hidden sizes from 256 up make the product
# dear enough to win anyway (K = 640, M = 128: 234 against 430 ms); below (the overhead bench's
# hidden 64), the LM head gets no kernel and keeps the plain GEMM into the runner's reused buffer.
_LM_HEAD_KERNEL_MIN_HIDDEN = 256


class CpuKernel:
    """x (M, K) @ W^T for one layer's weight W (N, K), by a faster CPU route than MKL's. It
    remembers W's version: once W changes in place, it no longer applies (stale, never wrong)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # the layer's plain weight (its version tells a stale kernel)
        self.version = weight._version

    def current(self, weight: torch.Tensor) -> bool:
        """Whether this kernel was built from `weight` as it is now."""
        return self.weight is weight and weight._version == self.version

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this kernel computes x (else the plain weight's path does)."""
        return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] > 0 and not torch.is_grad_enabled()
                and self.weight._version == self.version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) → (M, N) in x's dtype."""
        raise NotImplementedError


class PackedFp32(CpuKernel):
    """The exact fp32 product through oneDNN with W prepacked (fast mode only: batch-invariant
    mode keeps its fixed MKL tiles)."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor):
        super().__init__(weight)
        self.packed = packed  # oneDNN's blocked layout of W

    @classmethod
    def of(cls, weight: torch.Tensor) -> "PackedFp32 | None":
        """W (N, K), fp32 on CPU, prepacked; None where oneDNN's reorder is unavailable."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return None
        try:
            return cls(weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT))
        except (RuntimeError, AttributeError):  # a build without the op (e.g. some non-x86 wheels)
            return None

    def applies(self, x: torch.Tensor) -> bool:
        return not _batch_invariant and x.dtype == torch.float32 and super().applies(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


# int8 (`quantize="int8"`; not exact): weights and activations both int8 with one scale per
# _Q8_BLOCK values of the reduction (fp32 for activations, fp16 for weights). Teacher-forced
# top-1 agreement with fp32 on Gemma 3 270M (bench/bench_quality.py, 19,095 tokens): per-row
# scales reached 78.9% (fbgemm; int8 weights alone 95.8%, 8-bit activations alone 89.4%), blocks
# of 32 on both sides 96.7%, blocks of 16 97.4% (97.38% with the weights' scales in fp16). No kept
# int8 GEMM takes block scales, hence the native kernel. On AVX2 without VNNI an int8 pair product
# costs more instructions than an fp32 FMA does, so the mode pays off where the weights' bytes
# bound the step (single-stream decode: the LM head at M = 1 reads 178 MB instead of 671 MB,
# 7.4-8.1 against 34 ms with 189) and costs time at batch (bench/bench_int8.py has the numbers).
_Q8_BLOCK = 16  # values per int8 scale block along the reduction: activations, and every layer's weights but the head's
# The LM head's weights (the tied embedding) take one scale per 32 values instead: GGUF checkpoints
# store it as Q8_0 (int8, one fp16 scale per 32), which these blocks quantize back to its own codes
# and scales (no error beyond the checkpoint's), and its 262,144 x 640 product at M = 1 streams 178
# MB instead of 189. Top-1 agreement 97.43% (97.38% with 16; 97.34% with 32 on every layer).
_Q8_HEAD_BLOCK = 32
# Smaller products run on one thread (OpenMP hand-off: a one-row 640 x 1024 product measured 69 us
# on one thread, 49 on two).
_Q8_MIN_SPLIT_MACS = 1 << 16


class Int8Blocks(CpuKernel):
    """x @ W^T with int8 weights and int8 activations, each with one scale per _Q8_BLOCK values of
    the reduction (the LM head's W per _Q8_HEAD_BLOCK; fp16 for W, fp32 for x; llama.cpp's Q8_0
    with half the block), the block sums exact in int32: the native q8_gemm kernel
    (gemma_dist/model/native/q8_gemm.c), its output rows split over torch's thread count by the
    kernel's own threads. Each output is one fixed sequence of operations: batch-invariant. The
    reduction is zero-padded to a multiple of 32."""

    def __init__(self, weight: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, library):
        super().__init__(weight)
        self.qweight, self.scales = qweight, scales  # (N, Kp) int8, (N, Kp / weight block) fp16
        self.lib = library
        n, width = qweight.shape
        self.panel = max(4, (256 << 10) // width // 4 * 4)  # weight rows per panel: ~256 KB stays in cache
        self.split_rows = -(-_Q8_MIN_SPLIT_MACS // (n * width))  # from this many x rows, the threads split it

    @classmethod
    def of(cls, weight: torch.Tensor, weight_block: int = _Q8_BLOCK) -> "Int8Blocks":
        """Quantize W (N, K) in blocks of `weight_block` values (_Q8_BLOCK, or _Q8_HEAD_BLOCK for the
        LM head); raises native.NativeUnavailable without the kernel."""
        lib = _q8_library(weight_block)
        qweight, scales = _q8_quantize_weight(_pad_to_blocks(weight.detach().float().cpu()), weight_block)
        return cls(weight, qweight, scales, lib)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _pad_to_blocks(x if x.dtype == torch.float32 else x.float())
        rows, n = x32.shape[0], self.qweight.shape[0]
        y = torch.empty(rows, n, dtype=torch.float32)
        threads = torch.get_num_threads() if rows >= self.split_rows else 1
        if self.lib.q8_linear(x32.data_ptr(), rows, x32.shape[1], self.qweight.data_ptr(), self.scales.data_ptr(),
                              n, self.panel, y.data_ptr(), threads):
            raise MemoryError(f"q8_linear: no scratch for a ({rows}, {x32.shape[1]}) int8 copy of x")
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _q8_library(weight_block: int = _Q8_BLOCK):
    """The native q8 kernel for weights in blocks of `weight_block` values, its argument types
    declared. Its calls hold the GIL and split their work over the kernel's own threads: with the
    GIL released and a Python thread pool the served int8 mode (a Ray worker, whose other threads
    may hold the GIL when a call comes back) measured 0.91x the in-process engine, with this 1.03x
    (bench_serving --quantize int8)."""
    import ctypes

    from gemma_dist.model import native

    lib = native.load("q8_gemm", (("QB", str(_Q8_BLOCK)), ("WQB", str(weight_block))), hold_gil=True)
    if not getattr(lib, "_typed", False):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.q8_quantize.argtypes = [ptr, i64, i64, i64, ptr, ptr]
        lib.q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64]
        lib.q8_quantize.restype = None
        lib.q8_linear.restype = ctypes.c_int
        lib._typed = True
    return lib


def _pad_to_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) contiguous, zero-padded on the right to whole 32-value chunks (the kernel's step;
    whole blocks too)."""
    pad = -x.shape[1] % 32
    return (F.pad(x, (0, pad)) if pad else x).contiguous()


def _q8_quantize_weight(w: torch.Tensor, block: int = _Q8_BLOCK,
                        rows_per_pass: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights: W (N, K) fp32, K a multiple of `block` → int8 codes (N, K) and fp16 scales (N, K /
    block). Per block: scale = max |w| / 127 rounded to fp16, codes = w / scale (the rounded one)
    rounded to the nearest integer, ties to even, within [-127, 127]; a zero block has scale 0 and
    codes 0. fp16 scales: at M = 1 the product streams the weights, and fp32 ones were a fifth of
    their bytes. `rows_per_pass` bounds the temporaries (the LM head is 262,144 rows)."""
    rows, width = w.shape
    codes = torch.empty(rows, width, dtype=torch.int8)
    scales = torch.empty(rows, width // block, dtype=torch.float16)
    for start in range(0, rows, rows_per_pass):
        blocks = w[start: start + rows_per_pass].reshape(-1, width // block, block)
        # (rows, blocks); a weight beyond ±127 * 65504 (no real checkpoint's) saturates at fp16's largest scale
        half = (blocks.abs().amax(dim=2) / 127.0).clamp_(max=65504.0).to(torch.float16)
        scale = half.float()[..., None]
        q = torch.where(scale > 0, blocks / scale, torch.zeros((), dtype=blocks.dtype))
        codes[start: start + rows_per_pass] = torch.round(q).clamp_(-127, 127).to(torch.int8).reshape(-1, width)
        scales[start: start + rows_per_pass] = half
    return codes, scales


# The greedy LM head of a narrow fp32 model (hidden below _LM_HEAD_KERNEL_MIN_HIDDEN: the overhead
# bench's hidden 64): its product is bound by writing its (M, V) output, not by its arithmetic. The
# native argmax_head kernel keeps each 6 x 16 tile of logits in registers and reduces it at once;
# with W packed once into 16-row K-major panels it measured 51 ms at M = 256 against 111-147 for the
# chunked torch head (vocabulary 262,144, hidden 64, 2 threads of an AVX2 EPYC; 167 GFLOP/s).
# Each logit is one K-ordered fma chain: batch-invariant, and bitwise MKL's GEMM value here from
# 6 rows up (its matrix-vector form below sums in another order, a few ulp apart).
class PackedArgmax(CpuKernel):
    """Per row of x (M, K): the largest fp32 logit over vocabulary rows [0, limit) of the layer's W
    (V, K) and its lowest index, by the native kernel over a packed copy of W (V * K floats more).
    Not a product: `best` replaces `lm_head_argmax`'s whole or chunked logits where it applies."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor, library):
        super().__init__(weight)
        self.packed = packed  # (ceil(V / 16), K, 16) fp32: W's rows in 16-row K-major panels
        self.lib = library

    @classmethod
    def of(cls, weight: torch.Tensor) -> "PackedArgmax | None":
        """W (V, K) fp32 on CPU, packed; None for another dtype or device, or without the kernel
        (the chunked torch head serves instead, with the same results)."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return None
        lib = _argmax_library()
        if lib is None:
            return None
        vocab, width = weight.shape
        w = weight.detach().contiguous()
        packed = torch.empty(-(-vocab // 16), width, 16, dtype=torch.float32)
        lib.pack_panels(w.data_ptr(), vocab, width, packed.data_ptr())
        return cls(weight, packed, lib)

    def applies(self, x: torch.Tensor) -> bool:
        return not _batch_invariant and x.dtype == torch.float32 and super().applies(x)

    def best(self, x: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (M,) fp32, ids (M,) int64) over ids [0, limit), limit <= V; (-inf, 0) where no
        logit beats -inf (NaN logits are never picked)."""
        x = x.contiguous()
        rows = x.shape[0]
        values, ids = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.int64)
        limit = min(limit, self.weight.shape[0])
        if self.lib.argmax_head(x.data_ptr(), rows, x.shape[1], self.packed.data_ptr(), limit,
                                torch.get_num_threads(), values.data_ptr(), ids.data_ptr()):
            raise MemoryError(f"argmax_head: no scratch for {rows} rows")
        return values, ids


def _native_rows_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, ids) of each fp32 CPU row's maximum, its first index (NaN never picked), by the native
    kernel; None where it cannot run (the caller takes torch's argmax)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype != torch.float32:
        return None
    lib = _argmax_library()
    if lib is None:
        return None
    rows = logits.shape[0]
    values, ids = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.int64)
    lib.rows_argmax(logits.data_ptr(), rows, logits.shape[1], logits.stride(0), values.data_ptr(), ids.data_ptr())
    return values, ids


@functools.cache
def _argmax_library():
    """The native argmax_head kernel, typed; None where it cannot build (the torch forms serve).
    Cached either way: without the kernel, each greedy step no longer retries the build check."""
    import ctypes

    def declare(lib, i64, ptr):
        lib.pack_panels.argtypes = [ptr, i64, i64, ptr]
        lib.pack_panels.restype = None
        lib.argmax_head.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr]
        lib.argmax_head.restype = ctypes.c_int
        lib.rows_argmax.argtypes = [ptr, i64, i64, i64, ptr, ptr]
        lib.rows_argmax.restype = None

    return _optional_native("argmax_head", "greedy LM head", declare)


def linear(x: torch.Tensor, weight: torch.Tensor, kernel: CpuKernel | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T → (M, N), choosing the fastest form on CPU: the layer's `kernel`
    where it applies, else MKL's (fixed tiles in batch-invariant mode)."""
    if kernel is not None and kernel.applies(x):
        return kernel(x)
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight)
    if _batch_invariant:
        return _invariant_linear(x, weight) if x.shape[0] else F.linear(x, weight)
    rows, padded = x.shape[0], _padded_rows(x.shape[0])
    if padded != rows:
        return linear(F.pad(x, (0, 0, 0, padded - rows)), weight)[:rows]
    threads = _row_split_threads(x, weight)
    if threads:
        return _row_split_matmul(x, weight, threads)
    if _TRANSPOSED_M[0] <= rows <= _TRANSPOSED_M[1]:
        # Contiguous again: reductions over a strided last dim sum in another order.
        return torch.mm(weight, x.t()).t().contiguous()
    return F.linear(x, weight)


def lm_head(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
            kernel: CpuKernel | None = None) -> torch.Tensor:
    """x (M, K) @ weight (V, K)^T → (M, V) for a huge V. On CPU: up to 4 rows go through
    `linear` (row-split matrix-vector / small GEMM), more run as one GEMM, written into `out`
    (M, V) when given: a reused buffer saves the page faults of a fresh (M, V) result, which
    measured as long as the product itself for K = 64 (17.5 against 40 ms at M = 64). (Vocabulary chunks of
    (W_chunk @ x^T), once ~2x faster on an AVX2 machine at M = 16..64, measured 1.1-2.3x slower
    than one GEMM on an AVX-512 one for K = 64 and 640, and they open one parallel region per
    chunk, which collapses when other processes share the cores.) Batch-invariant mode: fixed tiles.
    The layer's `kernel`, where it applies, instead (`out` unused)."""
    rows = x.shape[0]
    if kernel is not None and kernel.applies(x):
        return kernel(x)
    if x.device.type == "cpu" and x.dim() == 2 and _batch_invariant and rows:
        return _invariant_lm_head(x, weight)
    if x.device.type != "cpu" or x.dim() != 2 or rows <= 4:
        return linear(x, weight).contiguous()
    if out is not None and out.dtype == x.dtype:
        return torch.mm(x, weight.t(), out=out)
    return F.linear(x, weight)


# Greedy rows need only each row's best logit, not the (M, V) logits: on CPU the LM head then runs
# in vocabulary chunks into one reused scratch, each chunk reduced at once (block maxima; the
# winning block's logits kept per row), so the product no longer writes and rereads (M, V) floats
# (268 MB at M = 256). From 16 rows each chunk is (W_chunk @ x^T), (C, M): MKL runs that form
# faster here and it is bitwise the plain form's product from 16 rows up (below, the plain form
# keeps `lm_head`'s values). Hidden 64 (the overhead bench's model), medians of engine steps that
# alternate between the two paths (2-core AVX2): M = 256, 70 ms against 122 ms for the whole product
# and its argmax; M = 64, 21 against 30 ms. Unmeasured on other CPUs: `lm_head`'s note found plain
# vocabulary chunks slower than one GEMM on an AVX-512 machine (there without the argmax pass saved).
# Hidden 640 keeps its prepacked whole product (chunks measured 1.3-3x slower than it, M = 8..128).
# A narrow fp32 head with the native kernel (PackedArgmax, below) skips the chunks as well.
_ARGMAX_CHUNK = 8192  # vocabulary rows per chunk: (8192, 256) fp32 is 8 MB
_ARGMAX_BLOCK = 1024  # the blocks whose maxima each chunk is reduced to


def lm_head_argmax(x: torch.Tensor, weight: torch.Tensor, limit: int, softcap: float | None = None,
                   kernel: CpuKernel | None = None,
                   argmax_kernel: PackedArgmax | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (M, K): the largest fp32 logit over vocabulary rows [0, limit) of weight (V, K),
    final softcap applied, and its index (the first on ties, as argmax). Returns (values (M,) fp32,
    ids (M,) int64); limit <= 0 gives (-inf, 0). The values are the same fp32 products as `lm_head`'s
    (bitwise where the BLAS computes a row alike in both forms; see the note above). On CPU with the
    plain GEMM (no kernel, not batch-invariant, more than 4 rows) the (M, V) logits are never built;
    nor with `argmax_kernel` (PackedArgmax, no softcap), which then computes the whole answer."""
    rows = x.shape[0]
    if limit <= 0 or rows == 0:
        return (torch.full((rows,), float("-inf"), device=x.device),
                torch.zeros(rows, dtype=torch.long, device=x.device))
    if softcap is None and argmax_kernel is not None and argmax_kernel.applies(x):
        return argmax_kernel.best(x, limit)
    chunked = (x.device.type == "cpu" and x.dim() == 2 and rows > 4 and not _batch_invariant
               and not torch.is_grad_enabled() and not (kernel is not None and kernel.applies(x)))
    if not chunked:
        logits = _soft_capped(lm_head(x, weight, kernel=kernel).float(), softcap)[:, :limit]
        if logits.is_cpu and not torch.is_grad_enabled():
            found = _native_rows_argmax(logits)
            if found is not None:
                return found
        ids = logits.argmax(dim=-1)  # first index on ties
        return logits.gather(1, ids[:, None]).squeeze(1), ids
    return _chunked_argmax(x, weight, limit, softcap)


def _soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), as GemmaForCausalLM.compute_logits applies it (None: unchanged)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _chunked_argmax(x: torch.Tensor, weight: torch.Tensor, limit: int,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_head_argmax` on CPU, _ARGMAX_CHUNK vocabulary rows at a time (see the note above)."""
    rows, block = x.shape[0], _ARGMAX_BLOCK
    transposed = rows >= _TRANSPOSED_M[0]
    best = torch.full((rows,), float("-inf"))  # (M,) best logit so far
    best_block = torch.zeros(rows, dtype=torch.long)  # (M,) its block's index over the vocabulary
    kept = torch.full((rows, block), float("-inf"))  # (M, block) that block's logits
    scratch = torch.empty((_ARGMAX_CHUNK, rows) if transposed else (rows, _ARGMAX_CHUNK), dtype=x.dtype)
    for start in range(0, limit, _ARGMAX_CHUNK):
        width = min(_ARGMAX_CHUNK, limit - start)
        chunk = _chunk_logits(x, weight[start:start + width], scratch, transposed, softcap)  # (width, M) fp32
        if width % block:  # the vocabulary's tail: pad to whole blocks with -inf (never picked)
            chunk = F.pad(chunk, (0, 0, 0, block - width % block), value=float("-inf"))
        blocks = chunk.view(-1, block, rows)  # (nb, block, M)
        maxima = blocks.amax(dim=1)  # (nb, M)
        which = maxima.argmax(dim=0)  # (M,) the chunk's first block holding its maximum
        value = maxima.gather(0, which[None]).squeeze(0)
        better = (value > best).nonzero().squeeze(1)  # strictly: an earlier equal maximum keeps its index
        if better.numel():
            picked = which[better]
            kept[better] = blocks[picked, :, better]  # (n, block)
            best[better] = value[better]
            best_block[better] = picked + start // block
    return best, best_block * block + kept.argmax(dim=1)


def _chunk_logits(x: torch.Tensor, rows_of_weight: torch.Tensor, scratch: torch.Tensor, transposed: bool,
                  softcap: float | None) -> torch.Tensor:
    """Logits of x (M, K) against rows_of_weight (C, K) as fp32 (C, M), softcapped: the product
    (W @ x^T) when `transposed`, else (x @ W^T) seen transposed; into `scratch` when it fills it."""
    fits = rows_of_weight.shape[0] == _ARGMAX_CHUNK
    if transposed:
        logits = torch.mm(rows_of_weight, x.t(), out=scratch) if fits else torch.mm(rows_of_weight, x.t())
    else:
        logits = (torch.mm(x, rows_of_weight.t(), out=scratch) if fits else torch.mm(x, rows_of_weight.t())).t()
    return _soft_capped(logits.float(), softcap)


# --------------------------------------------------------------------------- norm


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by (1 + w); w is stored as in HF checkpoints.

    The forward runs once per norm per layer per step (109 times a token for Gemma 3 270M), and on
    small batches its cost is op dispatch, not arithmetic: (1 + w) is kept between calls (rebuilt
    when w changes) and fp32 input skips its no-op casts. fp32 on an AVX2 CPU takes the native
    kernel (one call for the whole norm: native/rms_norm.c; its sum of squares runs in its own fixed
    order, so the last bits differ from the torch form's); elsewhere the torch form."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._scale: torch.Tensor | None = None  # (dim,) fp32 1 + w, as of _scale_key
        self._scale_key: tuple | None = None  # w's (tensor identity, version, storage) when _scale was built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize over the last dim in fp32, scale by (1 + w), back to x.dtype."""
        if x.dtype == torch.float32 and x.is_cpu and _native_norm_applies(x):
            return _native_rms_norm(x, self.scale(), self.eps)
        x32 = x if x.dtype == torch.float32 else x.float()
        inverse_rms = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        normed = (x32 * inverse_rms).mul_(self.scale())
        return normed if normed.dtype == x.dtype else normed.to(x.dtype)

    def scale(self) -> torch.Tensor:
        """(1 + w) in fp32, rebuilt only when w was replaced or changed in place. On XLA the graph
        computes it every time (a kept lazy tensor would make the first graph differ from the next,
        a recompilation); under CUDA graph capture it is not kept (capture records, it does not compute)."""
        weight = self.weight
        key = self._scale_key
        if key is not None and key == (id(weight), weight._version, weight.data_ptr()):  # the usual case, cheaply
            return self._scale
        if weight.device.type not in ("cpu", "cuda"):
            return 1.0 + weight.float()
        key = (id(weight), weight._version, weight.data_ptr())  # data_ptr: a move to another device changes it
        if self._scale_key != key:
            scale = 1.0 + weight.detach().float()
            if weight.is_cuda and torch.cuda.is_current_stream_capturing():
                return scale
            self._scale, self._scale_key = scale, key
        return self._scale


def residual_norm(x: torch.Tensor, h: torch.Tensor, post: RMSNorm | None,
                  pre: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual step: the new residual stream x + post(h) (x + h without a
    post-norm, as in Gemma 1) and pre(it), the next sublayer's input; x, h (T, H). fp32 CPU rows take
    one native call (rms_norm.c residual_rms_norm) with the same roundings as the norm, add and norm."""
    if (x.dtype == torch.float32 and h.dtype == torch.float32 and x.is_cpu and x.dim() == 2 and x.shape == h.shape
            and x.is_contiguous() and h.is_contiguous() and (post is None or post.eps == pre.eps)
            and not torch.is_grad_enabled()):
        lib = _norm_library()
        if lib is not None:
            total, normed = torch.empty_like(x), torch.empty_like(x)
            threads = torch.get_num_threads() if x.numel() >= _NORM_SPLIT_VALUES else 1
            lib.residual_rms_norm(x.data_ptr(), h.data_ptr(), x.shape[0], x.shape[1],
                                  None if post is None else post.scale().data_ptr(), pre.scale().data_ptr(), pre.eps,
                                  total.data_ptr(), normed.data_ptr(), threads)
            return total, normed
    if post is not None:
        h = post(h)
    x = x + h
    return x, pre(x)


# --------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, computed in fp32, each (T, 1, head_dim) in `dtype`:
    cos, and sin with its first half negated (`apply_rope` multiplies it by x's halves swapped,
    which with the sign folded in is rotate_half(x) * sin, exactly: negation rounds nothing).

    Linear scaling divides the frequencies by `scaling` (Gemma 3 4b+ global layers).
    The half-split layout (rotate_half) matches HF, gemma_pytorch and llama.cpp's NEOX mode.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents) / scaling  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, D) by `rope_cos_sin`'s tables (T, 1, D): x * cos + rotate_half(x) * sin,
    rotate_half(x) = (-x2, x1), computed as x * cos + (x2, x1) * (-sin1, sin2), the same products."""
    if x.dtype == torch.float32 and x.is_cpu and _native_rope_applies(x, cos, signed_sin):
        return _native_rope(x, cos, signed_sin)
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return (x * cos).add_(swapped.mul_(signed_sin))


def _native_rope_applies(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether the native RoPE (native/rope.c: bitwise the torch form) takes this fp32 CPU x: (T,
    heads, D) rows of contiguous values, fp32 (T, 1, D) tables, no autograd, the kernel built here."""
    return (x.dim() == 3 and x.stride(2) == 1 and x.shape[-1] % 2 == 0 and cos.dtype == torch.float32
            and signed_sin.dtype == torch.float32 and cos.shape == signed_sin.shape == (x.shape[0], 1, x.shape[2])
            and cos.is_contiguous() and signed_sin.is_contiguous() and not torch.is_grad_enabled()
            and _rope_library() is not None)


def _native_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` by the native kernel: a new contiguous (T, heads, D) tensor."""
    y = torch.empty(x.shape, dtype=torch.float32)
    threads = torch.get_num_threads() if x.numel() >= _NORM_SPLIT_VALUES else 1
    _rope_library().rope(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), x.stride(1), x.shape[2], cos.data_ptr(),
                         signed_sin.data_ptr(), y.data_ptr(), threads)
    return y


def native_attention_prologue(qkv: torch.Tensor, heads: int, kv_heads: int, q_norm: RMSNorm | None,
                              k_norm: RMSNorm | None, cos: torch.Tensor, signed_sin: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """Everything between the fused QKV projection and attention in one native call (rope.c
    attention_prologue): from qkv (T, (heads + 2 kv_heads) * D), q/k norms (both or neither), RoPE on
    q and k, and the new keys and values stored at their cache slots (caches (pages, block_size,
    kv_heads, D)); returns q (T, heads, D), each value rounded as the separate ops round it. None where
    the kernel does not take these tensors (not fp32 CPU contiguous, autograd on, no kernel built):
    the caller runs the ops."""
    t, width = qkv.shape if qkv.dim() == 2 else (0, 0)
    head_dim = k_cache.shape[-1]
    if not (qkv.dtype == torch.float32 and qkv.is_cpu and width == (heads + 2 * kv_heads) * head_dim
            and qkv.is_contiguous() and (q_norm is None) == (k_norm is None)
            and (q_norm is None or q_norm.eps == k_norm.eps) and head_dim <= _PROLOGUE_MAX_HEAD_DIM
            and cos.dtype == torch.float32 and signed_sin.dtype == torch.float32
            and cos.shape == signed_sin.shape == (t, 1, head_dim) and cos.is_contiguous() and signed_sin.is_contiguous()
            and k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.shape == v_cache.shape
            and k_cache.shape[2] == kv_heads and k_cache.is_contiguous() and v_cache.is_contiguous()
            and slots.dtype == torch.int64 and slots.shape == (t,) and slots.is_contiguous()
            and not torch.is_grad_enabled()):
        return None
    lib = _rope_library()
    if lib is None:
        return None
    q = torch.empty(t, heads, head_dim, dtype=torch.float32)
    threads = torch.get_num_threads() if qkv.numel() >= _NORM_SPLIT_VALUES else 1
    norms = (None, None, 0.0) if q_norm is None else (q_norm.scale().data_ptr(), k_norm.scale().data_ptr(), q_norm.eps)
    if lib.attention_prologue(qkv.data_ptr(), t, width, heads, kv_heads, head_dim, *norms, cos.data_ptr(),
                              signed_sin.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                              slots.data_ptr(), k_cache.shape[0] * k_cache.shape[1], threads):
        raise IndexError(f"attention_prologue: a slot of {slots.tolist()} is outside the cache's "
                         f"{k_cache.shape[0] * k_cache.shape[1]} slots")
    return q


_PROLOGUE_MAX_HEAD_DIM = 1024  # rope.c's per-row scratch (PROLOGUE_MAX_HEAD_DIM)


@functools.cache
def _rope_library():
    """The native rope kernel (and the attention prologue beside it), typed; None where it cannot
    build (the torch form serves)."""
    import ctypes

    def declare(lib, i64, ptr):
        lib.rope.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64]
        lib.rope.restype = None
        lib.attention_prologue.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, ptr,
                                           ptr, ptr, ptr, i64, i64]
        lib.attention_prologue.restype = ctypes.c_int

    return _optional_native("rope", "RoPE", declare)


# --------------------------------------------------------------------------- parallel linear layers


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; several checkpoint tensors may be fused.

    `segments` lists (checkpoint_suffix, full_rows, rows_per_rank, rank_row_start) for
    each fused piece: e.g. q/k/v or gate/up. Output stays sharded (no communication).
    With `held` > 1 (SPMD) the weight stacks `held` ranks' fused slices: (held * rows, in).
    """

    split_dim = 0  # the weight dim the ranks split (SPMD shards it over the mesh)

    def __init__(self, in_features: int, segments: list[tuple[str, int, int, int]], held: int = 1):
        super().__init__()
        self.in_features = in_features
        self.segments = segments
        self.held = held
        out_local = sum(rows for _, _, rows, _ in segments)
        self.weight = nn.Parameter(torch.empty(held * out_local, in_features))
        self.cpu_kernel: CpuKernel | None = None  # a faster CPU route for the weight (set_cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) → (T, held * this rank's out rows)."""
        return linear(x, self.weight, self.cpu_kernel)

    def split_segments(self, y: torch.Tensor) -> list[torch.Tensor]:
        """forward's (T, held * rows) → one (T, held * segment rows) tensor per fused segment,
        each in checkpoint order (rank 0's rows first). Views, no copies, when held == 1."""
        sizes = [rows for _, _, rows, _ in self.segments]
        if self.held == 1:
            return list(y.split(sizes, dim=-1))
        parts = y.view(y.shape[0], self.held, sum(sizes)).split(sizes, dim=-1)  # (T, held, rows) each
        return [p.reshape(y.shape[0], -1) for p in parts]

    def shard_specs(self, prefix: str, param_name: str) -> dict[str, ShardSpec]:
        """Checkpoint name → where its slice lands in this layer's weight."""
        specs, offset = {}, 0
        for suffix, full_rows, rows, start in self.segments:
            specs[f"{prefix}.{suffix}.weight"] = ShardSpec(
                param_name, (full_rows, self.in_features), dim=0, start=start, stop=start + rows,
                offset=offset)
            offset += rows
        return specs


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums all-reduced."""

    split_dim = 1  # the weight dim the ranks split (SPMD shards it over the mesh)

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.in_full = in_features
        self.in_local = split_evenly(in_features, parallel.size, "row-parallel input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local * parallel.held))
        self.cpu_kernel: CpuKernel | None = None  # a faster CPU route for the weight (set_cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, this rank's in cols) → (T, out), summed over ranks."""
        return self.parallel.all_reduce(linear(x, self.weight, self.cpu_kernel))

    def shard_specs(self, name: str, param_name: str) -> dict[str, ShardSpec]:
        """Checkpoint name → this rank's column slice."""
        start = self.parallel.rank * self.in_local
        return {name: ShardSpec(param_name, (self.weight.shape[0], self.in_full), dim=1,
                                start=start, stop=start + self.in_local)}


class VocabParallelEmbedding(nn.Module):
    """The tied embedding / LM head, its vocabulary rows split across ranks.

    Embedding: each rank looks up the ids it owns and the partial results are summed.
    LM head: each rank computes its vocabulary slice of the logits, gathered on demand.
    """

    split_dim = 0  # the weight dim the ranks split (SPMD shards it over the mesh)

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.vocab_local = math.ceil(vocab_size / parallel.size)
        self.vocab_start = parallel.rank * self.vocab_local
        self.vocab_stop = min(vocab_size, self.vocab_start + self.vocab_local)
        # SPMD: every rank's rows stacked = the whole vocabulary, zero-padded to size * local.
        self.weight = nn.Parameter(torch.empty(self.vocab_local * parallel.held, dim))
        self.cpu_kernel: CpuKernel | None = None  # a faster CPU route for the weight (set_cpu_kernels)
        self.argmax_kernel: PackedArgmax | None = None  # the greedy head's native route (set_cpu_kernels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids → (T, H) embeddings (each rank looks up the ids it owns; summed)."""
        if not self.parallel.communicates:
            return F.embedding(ids, self.weight)
        owned = (ids >= self.vocab_start) & (ids < self.vocab_stop)
        local_ids = torch.where(owned, ids - self.vocab_start, torch.zeros_like(ids))
        out = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)

    def logits(self, hidden: torch.Tensor, gather: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) → (N, vocab) logits; with gather=False, this rank's slice (N, vocab_local).
        `out`: a (N, vocab_local) buffer the slice may be written into (reused across steps)."""
        local = lm_head(hidden, self.weight, out, self.cpu_kernel)
        if not gather:
            return local
        if self.parallel.spmd:
            return local[..., : self.vocab_size]
        return self.parallel.all_gather_last_dim(local)[..., : self.vocab_size]

    def argmax(self, hidden: torch.Tensor, limit: int, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) → this rank's best logit per row over ids below `limit` (softcapped, fp32) and its
        id (the lowest on ties), both (N,): `lm_head_argmax` over this rank's vocabulary slice."""
        local_limit = min(self.vocab_local, limit - self.vocab_start)
        values, ids = lm_head_argmax(hidden, self.weight, local_limit, softcap, self.cpu_kernel, self.argmax_kernel)
        return values, ids + self.vocab_start

    def shard_specs(self, name: str, param_name: str) -> dict[str, ShardSpec]:
        """Checkpoint name → this rank's vocabulary rows; rows past the vocabulary (the last
        ranks' tail when tp does not divide it) are zero padding."""
        return {name: ShardSpec(param_name, (self.vocab_size, self.weight.shape[1]), dim=0,
                                start=self.vocab_start, stop=self.vocab_start + self.vocab_local)}


QUANTIZATIONS = ("int8",)
KERNEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)  # the layers a CpuKernel serves


def set_cpu_kernels(model: nn.Module, quantize: str | None = None, prepack: bool = True) -> int:
    """Give every parallel layer of a CPU model its CpuKernel, after loading: `quantize` "int8"
    → Int8Blocks (every layer, the LM head included), else with `prepack` fp32 weights →
    PackedFp32 except on an LM head narrower than _LM_HEAD_KERNEL_MIN_HIDDEN, which gets a
    PackedArgmax for its greedy rows instead, else none. A kernel whose weight changed since stops
    applying; another call rebuilds it and keeps current ones. Each tensor-parallel rank converts
    its own slice. Returns the layers given a product kernel."""
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    kind = Int8Blocks if quantize == "int8" else PackedFp32 if prepack else None
    count = 0
    for module in model.modules():
        if isinstance(module, KERNEL_LAYERS):
            kernel = module.cpu_kernel
            narrow_lm_head = (kind is PackedFp32 and isinstance(module, VocabParallelEmbedding)
                              and module.weight.shape[1] < _LM_HEAD_KERNEL_MIN_HIDDEN)
            if kind is None or module.weight.device.type != "cpu" or narrow_lm_head:
                kernel = None
            elif not (type(kernel) is kind and kernel.current(module.weight)):  # else: built from this weight already
                head = kind is Int8Blocks and isinstance(module, VocabParallelEmbedding)
                kernel = kind.of(module.weight, _Q8_HEAD_BLOCK) if head else kind.of(module.weight)
            module.cpu_kernel = kernel
            count += kernel is not None
            if isinstance(module, VocabParallelEmbedding):
                module.argmax_kernel = _argmax_kernel(module, narrow_lm_head)
    return count


def _argmax_kernel(embed: VocabParallelEmbedding, narrow_fp32: bool) -> PackedArgmax | None:
    """The embedding's PackedArgmax where its head is a narrow fp32 one on CPU (kept while current)."""
    kernel = embed.argmax_kernel
    if not narrow_fp32 or embed.weight.device.type != "cpu":
        return None
    return kernel if kernel is not None and kernel.current(embed.weight) else PackedArgmax.of(embed.weight)


def _native_decode_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether native decode attention takes these fp32 CPU tensors: q (T, Hq, D) rows of contiguous
    heads, contiguous caches, no autograd, and the kernel built here."""
    return (q.is_cpu and k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
            and q.stride(2) == 1 and q.stride(1) == q.shape[2] and k_cache.is_contiguous()
            and v_cache.is_contiguous() and not torch.is_grad_enabled() and _decode_library() is not None)


def _native_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup,
                             view: KeyView, scale: float, softcap: float | None, layer_group: int) -> torch.Tensor:
    """A decode group's attention (one query row per sequence) by the native kernel, reading keys and
    values in place through the view's pages and mask: (B, Hq * D)."""
    batch, heads, head_dim = group.batch, q.shape[1], q.shape[2]
    pages = view.pages(layer_group)  # (B * nb,) int64
    mask = view.mask.contiguous()  # (B, 1, nb * block_size) bool
    out = torch.empty(batch, heads * head_dim, dtype=torch.float32)
    work = batch * heads * mask.shape[-1] * head_dim
    threads = torch.get_num_threads() if work >= _DECODE_SPLIT_MACS else 1
    if _decode_library().decode_attention(
            q.data_ptr(), group.token_index.data_ptr(), q.stride(0), batch, heads, k_cache.shape[2], head_dim,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], pages.data_ptr(), pages.numel() // batch,
            mask.data_ptr(), scale, softcap or 0.0, out.data_ptr(), threads):
        raise MemoryError(f"decode_attention: no scratch for {mask.shape[-1]} keys")
    return out


_DECODE_SPLIT_MACS = 1 << 16  # from this much work a decode group splits its (sequence, KV head) pairs


@functools.cache
def _decode_library():
    """The native decode_attention kernel, typed; None where it cannot build (the torch form serves)."""
    import ctypes

    def declare(lib, i64, ptr):
        f32 = ctypes.c_float
        lib.decode_attention.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, f32, f32,
                                         ptr, i64]
        lib.decode_attention.restype = ctypes.c_int

    return _optional_native("decode_attention", "decode attention", declare)


def _native_norm_applies(x: torch.Tensor) -> bool:
    """Whether the native RMSNorm takes this fp32 CPU x: rows of contiguous values, 2 or 3 dims
    (the q/k norm's (T, heads, D) views included), no autograd, and the kernel built here."""
    return (x.dim() in (2, 3) and x.stride(-1) == 1 and x.numel() > 0 and not torch.is_grad_enabled()
            and _norm_library() is not None)


def _native_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's rows by the native kernel: a new contiguous tensor of x's shape."""
    y = torch.empty(x.shape, dtype=torch.float32)
    outer, inner = (x.shape[0], 1) if x.dim() == 2 else (x.shape[0], x.shape[1])
    s_outer, s_inner = x.stride(0), (x.stride(1) if x.dim() == 3 else 0)
    dim = x.shape[-1]
    threads = torch.get_num_threads() if x.numel() >= _NORM_SPLIT_VALUES else 1
    _norm_library().rms_norm(x.data_ptr(), outer, inner, s_outer, s_inner, dim, scale.data_ptr(), eps,
                             y.data_ptr(), threads)
    return y


_NORM_SPLIT_VALUES = 1 << 15  # from this many values a norm splits its rows over torch's threads


@functools.cache
def _norm_library():
    """The native rms_norm kernel, typed; None where it cannot build (the torch form serves). A row
    takes it under a microsecond."""
    import ctypes

    def declare(lib, i64, ptr):
        lib.rms_norm.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_float, ptr, i64]
        lib.rms_norm.restype = None
        lib.residual_rms_norm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, i64]
        lib.residual_rms_norm.restype = None

    return _optional_native("rms_norm", "RMSNorm", declare)


def _optional_native(name: str, what: str, declare: Callable) -> object | None:
    """The native kernel `name` (native/<name>.c), its functions typed by declare(lib, c_int64,
    c_void_p) and holding the GIL while they run (each call is short); None where it cannot build
    here, logged once (the caller's torch form serves: the same operation)."""
    import ctypes

    from gemma_dist.model import native

    try:
        lib = native.load(name, hold_gil=True)
    except native.NativeUnavailable as error:
        _log.info("%s: the torch form (%s)", what, error)
        return None
    declare(lib, ctypes.c_int64, ctypes.c_void_p)
    return lib


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, Gemma's activation in every generation."""
    return F.gelu(x, approximate="tanh")


ActivationFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- attention


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, local: bool, scale: float,
                    softcap: float | None, group: int = 0) -> torch.Tensor:
    """Attention of flat queries over the paged KV cache (new keys already written).

    q: (T, Hq, D) for the T new tokens; caches: (num_pages, block_size, Hkv, D), read through
    the block tables of layer group `group`. With
    meta.kernel set, the fused Triton kernel reads the cache in place (CUDA). Otherwise each
    group (all decode rows together, prefill chunks of one shape together) is one masked batched
    matmul over keys gathered through the block tables, except fp32 CPU decode groups, which the
    native kernel computes reading the cache in place (`_native_decode_attention`). Returns
    (T, Hq * D) in flat token order.
    """
    if meta.kernel is not None:
        from gemma_dist.model.paged_attention_kernel import paged_attention_kernel

        return paged_attention_kernel(q, k_cache, v_cache, meta.kernel, local, scale, softcap, group)
    outs = [_group_attention(q, k_cache, v_cache, g, g.window_view if local else g.global_view, scale, softcap,
                             group)
            for g in meta.groups]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if meta.output_order is None else out.index_select(0, meta.output_order)


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup,
                     view: KeyView, scale: float, softcap: float | None, layer_group: int) -> torch.Tensor:
    """One attention group's attention, through layer group `layer_group`'s pages: (B * Tq, Hq * D)."""
    if group.max_q == 1 and q.dtype == torch.float32 and _native_decode_applies(q, k_cache, v_cache):
        return _native_decode_attention(q, k_cache, v_cache, group, view, scale, softcap, layer_group)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[1]
    per_kv = heads // num_kv_heads
    batch, max_q = group.batch, group.max_q
    # index_select on the flattened table is ~10x faster than advanced indexing on CPU.
    blocks = view.pages(layer_group)  # (B * nb,)
    keys = k_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim)  # (B, Lk, Hkv, D)
    values = v_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim)
    rows = q if group.in_order else q.index_select(0, group.token_index)
    qg = rows.view(batch, max_q, num_kv_heads, per_kv, head_dim)
    # (B, Hkv, G*Tq, D) so each KV head serves its query group without repeating K/V.
    qg = qg.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, per_kv * max_q, head_dim)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).mul_(scale)  # (B, Hkv, G*Tq, Lk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, num_kv_heads, per_kv, max_q, -1).masked_fill_(view.hidden(), float("-inf"))
    probs = torch.softmax(scores if scores.dtype == torch.float32 else scores.float(), dim=-1)
    probs = probs.view(batch, num_kv_heads, per_kv * max_q, -1)
    if probs.dtype != q.dtype:
        probs = probs.to(q.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # (B, Hkv, G*Tq, D)
    out = out.view(batch, num_kv_heads, per_kv, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch * max_q, heads * head_dim)

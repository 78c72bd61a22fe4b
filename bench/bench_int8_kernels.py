#!/usr/bin/env python
"""int8 matrix-product candidates on Gemma 3 270M's real shapes, against fp32, in one run.

Shapes (out x in): 2048x640 (gate/up, one half), 640x2048 (down), 1024x640 (q, k, v fused), the
262,144x640 LM head; at M = 1 (single-stream decode) and M = 32 (batched decode), and M = 512 for the
2048x640 product (a prefill chunk). Candidates, each timed as `min` over repeats with the threads
torch uses (all cores):

  - fp32 F.linear (the exact mode) and fp32 through oneDNN with the weight prepacked once;
  - `torch.ops.aten._weight_int8pack_mm` (int8 weights, per-channel scales; weight-only: it
    multiplies fp32 activations by int8 weights converted in the kernel);
  - fbgemm dynamic quantization (`torch.ops.quantized.linear_dynamic`: int8 x int8 with one
    activation scale per call, per-channel weight scales);
  - `torch._int_mm` (int8 x int8 -> int32, oneDNN) with per-row activation scales applied by us;
  - layers.Int8Blocks (the int8 mode: the native kernel, int8 weights and activations with one
    scale per 16 values on each side);
  - torchao's int8 configs when torchao is importable (skipped otherwise: not a dependency).

Relative error is |y - y_fp32| / |y_fp32| (Frobenius) on Gaussian activations with a few outlier
columns (as real activations have), printed next to the time.

    .venv/bin/python bench/bench_int8_kernels.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [("gate/up half", 2048, 640, (1, 32, 512)), ("down", 640, 2048, (1, 32)),
          ("qkv", 1024, 640, (1, 32)), ("LM head", 262_144, 640, (1, 32))]


def best_time(fn, repeats: int) -> float:
    """Minimum seconds of `repeats` calls after two warm-ups."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale fp32 (N,)) with w ~= q * scale[:, None]."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def candidates(w: torch.Tensor) -> dict:
    """name -> callable(x) for one weight (N, K)."""
    q, scale = quantize_rows(w)
    out = {"fp32 F.linear": lambda x: F.linear(x, w)}
    packed_fp32 = torch.ops.mkldnn._reorder_linear_weight(w, 32)
    out["fp32 oneDNN prepacked"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed_fp32, None, "none", [], "")
    out["_weight_int8pack_mm"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)
    qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qweight, None)
    out["fbgemm linear_dynamic"] = lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    qt = q.t()  # (K, N) view

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        xs = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        xq = torch.round(x / xs).to(torch.int8)
        return torch._int_mm(xq, qt).float() * xs * scale

    out["_int_mm, per-row act scale"] = int_mm
    try:  # the int8 mode's kernel: int8 weights and activations, a scale per 16 values
        from gemma_dist.model.layers import Int8Blocks

        out["Int8Blocks (native, the int8 mode)"] = Int8Blocks.of(w)
    except Exception as e:  # noqa: BLE001 - no compiler or no AVX2 here: say so
        out["Int8Blocks"] = f"skipped ({type(e).__name__}: {str(e)[:60]})"
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                             ("torchao int8 dyn-act int8", Int8DynamicActivationInt8WeightConfig())):
            module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            module.weight.data.copy_(w)
            quantize_(module, config)
            out[name] = module
    except Exception as e:  # noqa: BLE001 - torchao absent or refusing this torch: not a dependency
        out["torchao"] = f"skipped ({type(e).__name__}: {str(e)[:60]})"
    return out


def activations(m: int, k: int) -> torch.Tensor:
    """Gaussian rows with a few 20x outlier columns."""
    x = torch.randn(m, k)
    x[:, :: max(1, k // 8)] *= 20
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"ms per call (min of {args.repeats}); err = relative Frobenius error against fp32\n")
    print("| shape (out x in) | M | candidate | ms | speed-up vs fp32 | err |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for label, n, k, ms in SHAPES:
            w = torch.randn(n, k) * 0.02
            fns = candidates(w)
            for m in ms:
                x = activations(m, k)
                reference = F.linear(x, w)
                base = None
                for name, fn in fns.items():
                    if isinstance(fn, str):
                        print(f"| {label} {n}x{k} | {m} | {name} | {fn} | | |")
                        continue
                    try:
                        t = best_time(lambda: fn(x), args.repeats if n < 100_000 else max(3, args.repeats // 4))
                        err = ((fn(x).float() - reference).norm() / reference.norm()).item()
                    except Exception as e:  # noqa: BLE001 - a kernel missing on this build: say so
                        print(f"| {label} {n}x{k} | {m} | {name} | failed: {type(e).__name__} | | |")
                        continue
                    base = base or t
                    print(f"| {label} {n}x{k} | {m} | {name} | {t * 1e3:.3f} | {base / t:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

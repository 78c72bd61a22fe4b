#!/usr/bin/env bash
# The one prepared GPU check, for a CUDA machine that has torch, triton and transformers but no
# network (the device tool's machines): the GPU tests, then bench/bench_serving.py on a Gemma 3
# 1B-sized random-weight model in bf16 against transformers' batched generate in the same run.
# Nothing is installed: gemma_dist runs from this checkout. Carry a tokenizer.model (the default
# model's, 5 MB) as TOKENIZER. Serving over Ray/gRPC is measured only where ray is importable;
# otherwise the in-process engine is. Logs go under ${OUT:-/tmp}.
#   OUT=/tmp TOKENIZER=.carry/tokenizer.model bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if $PY -c 'import grpc_tools' 2>/dev/null; then $PY gemma_dist/server/codegen.py; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
timeout 300 $PY -m pytest -q -p no:cacheprovider -rs tests/gpu tests/model/test_paged_attention_kernel.py \
    2>&1 | tee "$OUT/gpu_tests.log" || true
timeout 270 $PY bench/bench_serving.py --random-1b /tmp/gemma3-1b-random --tokenizer "${TOKENIZER:-}" \
    --dtype bfloat16 --device cuda --tp 1 --clients 32 --prompt-len 128 --output-len 128 \
    2>&1 | tee "$OUT/bench_serving_gpu.log"

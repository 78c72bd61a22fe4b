#!/usr/bin/env bash
# The one prepared GPU check (run where a CUDA machine is available, e.g. through the device tool):
# the gpu-marked tests, then the serving benchmark on a Gemma 3 1B-sized random-weight model in
# bf16 against transformers' batched generate in the same run. Writes logs under ${OUT:-/tmp}.
# Expects a Python with CUDA torch; installs gemma_dist (editable) and its test extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY -m pip install -q -e '.[test]' 2>&1 | tail -2
$PY gemma_dist/server/codegen.py
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider -rs tests/gpu tests/model/test_paged_attention_kernel.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY bench/bench_serving.py --random-1b /tmp/gemma3-1b-random --dtype bfloat16 --device cuda --tp 1 \
    --clients 32 --prompt-len 128 --output-len 128 2>&1 | tee "$OUT/bench_serving_gpu.log"

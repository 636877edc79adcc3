#!/usr/bin/env bash
# The serving benchmark on a GPU machine, with a small real-architecture Qwen2.5-VL in bf16.
#
# The GPU machine has PyTorch with CUDA but not this project's serving stack and no network, so the
# missing wheels travel in .whl/ (see bench/gpu/README.md); they go to /tmp/site, first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/spr-gpu-out}"; mkdir -p "$OUT" /tmp/site
for archive in .whl/*.tar.xz; do tar -xJf "$archive" -C /tmp/site; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, grpc, google.protobuf as pb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/gpu/build_small_policy.py --out /tmp/small-qwen2.5-vl 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
python3 bench/bench_serving.py --model /tmp/small-qwen2.5-vl --device cuda --dtype bfloat16 \
  --requests 64 --concurrency 16 --samples 8 --max-new-tokens 48 --swaps 5 --passes 1 --no-single \
  2>&1 | tee "$OUT/serving_gpu.log" | grep -v -i "warn\|Loading weights" | tail -15

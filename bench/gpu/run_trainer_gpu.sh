#!/usr/bin/env bash
# The trainer benchmark on a GPU machine: `bench/bench_trainer.py` (the trainer's recipe against a bare
# TRL DPOTrainer loop, same data, model and steps) in bf16 with a small real-architecture Qwen2.5-VL
# (~1B parameters, random weights, built by build_small_policy.py) on a few hundred synthetic pairs.
# Prints samples/s of both sides, their ratio and the peak CUDA memory of each; writes the figures
# to $OUT/trainer_gpu.json and the log to $OUT/trainer_gpu.log.
#
# The GPU machine has PyTorch with CUDA but not this project's training stack and no network, so the
# missing wheels travel in .whl-trainer/ (about 28 MiB, made by bench/gpu/fetch_trainer_wheels.sh);
# they go to /tmp/site, first on PYTHONPATH. Knobs (environment): PAIRS, STEPS, REPEATS, LORA_R, IMAGE_SIZE.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/spr-gpu-out}"; WHEELS="${WHEELS:-.whl-trainer}"; MODEL=/tmp/small-qwen2.5-vl
mkdir -p "$OUT" /tmp/site
started=$(date +%s)
for archive in "$WHEELS"/*.tar.xz; do tar -xJf "$archive" -C /tmp/site; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site:$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, peft, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"
echo "setup: $(( $(date +%s) - started ))s" | tee -a "$OUT/gpu.txt"
python3 bench/gpu/build_small_policy.py --out "$MODEL" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
# The tiny model's processor caps images at 112x112 pixels; a real Qwen2.5-VL deployment sees far more.
# Raise the cap to the common max_pixels = 1280*28*28 so 448x336 frames keep their 192 image tokens.
python3 - "$MODEL/processor_config.json" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["image_processor"]["size"] = {"shortest_edge": 56 * 56, "longest_edge": 1280 * 28 * 28}
json.dump(config, open(path, "w"), indent=2)
EOF
echo "model ready: $(( $(date +%s) - started ))s" | tee -a "$OUT/gpu.txt"
python3 bench/bench_trainer.py --model "$MODEL" --device cuda --pairs "${PAIRS:-256}" \
  --steps "${STEPS:-64}" --batch-size 4 --lora-r "${LORA_R:-128}" --image-size "${IMAGE_SIZE:-448x336}" \
  --repeats "${REPEATS:-1}" --warmup --json "$OUT/trainer_gpu.json" 2>&1 | tee "$OUT/trainer_gpu.log" \
  | grep -v -i "warn\|Loading weights\|it/s]\|s/it]" | tail -8
echo "total: $(( $(date +%s) - started ))s" | tee -a "$OUT/gpu.txt"

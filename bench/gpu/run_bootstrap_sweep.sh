#!/usr/bin/env bash
# Runs bench/gpu/bootstrap_sweep.py on a GPU machine (wheels from .whl-trainer/, see README.md here).
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-trainer/*.whl
export PYTHONPATH="/tmp/site:$PWD:$PWD/protos"
python3 bench/gpu/bootstrap_sweep.py --world /tmp/world --out "$OUT" --deadline "${SWEEP_DEADLINE:-380}"
for f in "$OUT"/sweep-*.json
do python3 -c "import json,sys
d=json.load(open(sys.argv[1]))
print(d[\"name\"], d[\"train_s\"], \"test\", {k: round(v,1) for k,v in d[\"acc_test\"].items()}, \"train\", {k: round(v,1) for k,v in d[\"acc_train\"].items()}, \"loss\", d[\"losses\"][-1])" "$f"
done
tail -n 3 "$OUT"/*.log

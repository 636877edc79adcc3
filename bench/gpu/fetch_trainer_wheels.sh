#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels run_trainer_gpu.sh installs on the GPU
# machine (Python 3.12, x86-64): what the trainer imports beyond that image's PyTorch stack, at the
# versions constraints.txt pins. About 30 MiB into .whl-trainer/ (ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${WHEELS:-.whl-trainer}"
mkdir -p "$DEST"
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
pin() { grep -iE "^${1//-/[-_.]}==" constraints.txt | head -1; }
packages=(trl datasets dill multiprocess peft transformers kafka-python protobuf grpcio
  grpcio-health-checking grpcio-reflection pydantic pydantic-core pydantic-settings python-dotenv
  typing-inspection annotated-types tritonclient python-rapidjson)
specs=()
for name in "${packages[@]}"; do
  spec=$(pin "$name"); [ -n "$spec" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  specs+=("$spec")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${specs[@]}"
du -sh "$DEST"

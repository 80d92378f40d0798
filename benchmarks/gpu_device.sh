#!/usr/bin/env bash
# benchmarks/gpu.py on the device machine (Python 3.12 with torch, transformers, peft, ...; nothing to download):
# install the carried wheels (.wheels/: diffusers, pydantic, open_clip_torch and their missing pure-Python needs)
# into .wheels/site, print the versions in use, then run the benchmark with a time budget. Results: $OUT/gpu.json
# (written after every measurement) and $OUT/gpu.log.
# Device call: command "bash benchmarks/gpu_device.sh", carry [".wheels"], timeout_s 520.
# Arguments go to gpu.py: with 15 device minutes, run the issue-12 cases in two calls,
#   bash benchmarks/gpu_device.sh --cases vc2-sampling,vc2-compile-sampling,t2v   (sampling targets, about 410 s)
#   BUDGET_S=330 bash benchmarks/gpu_device.sh --cases vc2-dpo,vc2-compile-training   (MFU, LoRA vs full, auto)
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench}"
BUDGET_S="${BUDGET_S:-420}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .wheels/site \
    .wheels/*.whl || exit 1
export PYTHONPATH="$PWD/.wheels/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 - <<'PY'
import importlib.metadata as metadata
import sys
print("python", sys.version.split()[0])
for name in ("torch", "diffusers", "transformers", "peft", "huggingface_hub", "pydantic", "open_clip_torch", "timm"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
PY
} 2>&1 | tee "$OUT/versions.txt"
python3 benchmarks/gpu.py --json "$OUT/gpu.json" --budget-s "$BUDGET_S" "$@" 2>&1 | tee "$OUT/gpu.log"

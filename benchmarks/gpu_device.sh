#!/usr/bin/env bash
# benchmarks/gpu.py on the device machine (Python 3.12 with torch, transformers, peft, ...; nothing to download):
# install the carried wheels (.wheels/: diffusers, pydantic, open_clip_torch and their missing pure-Python needs)
# into .wheels/site, print the versions in use, then run the benchmark with a time budget. Results: $OUT/gpu.json
# (written after every measurement) and $OUT/gpu.log.
# Device call: command "BUDGET_S=... bash benchmarks/gpu_device.sh --cases ...", carry [".wheels"], timeout_s at
# least BUDGET_S + 60 (and at most 600). Arguments go to gpu.py, whose cases run in the order --cases names them.
# 15 device minutes hold about 780 s of commands after the machine starts; the issue-12 plan in two calls:
#   BUDGET_S=500 bash benchmarks/gpu_device.sh --cases t2v-turbo,vc2-sampling,vc2-compile-sampling   (timeout_s 570)
#   BUDGET_S=<status budget_left_s - 60> bash benchmarks/gpu_device.sh --cases vc2-dpo   (at once: the machine is warm)
# Check here first: `bash benchmarks/gpu_device.sh --check-wheels` (the wheels a Python 3.12 device installs).
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench}"
BUDGET_S="${BUDGET_S:-500}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WHEELS=(diffusers-0.42.1 pydantic-2.14.4 pydantic_core-2.50.5 annotated_types typing_inspection typing_extensions
        open_clip_torch-3.3.0 ftfy wcwidth)
missing=()
for wheel in "${WHEELS[@]}"; do
    found=(.wheels/"$wheel"*.whl)
    if [ ! -e "${found[0]}" ]; then missing+=("$wheel"); elif [ "${#found[@]}" -gt 1 ]; then missing+=("one $wheel"); fi
done
if compgen -G ".wheels/*cp3*.whl" > /dev/null && ! compgen -G ".wheels/*cp312*.whl" > /dev/null; then
    missing+=("cp312 builds of the compiled wheels")
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "error: .wheels/ lacks: ${missing[*]} (pip download --no-deps --only-binary=:all: --python-version 3.12" \
         "--platform manylinux2014_x86_64 -d .wheels ...; carry [\".wheels\"])" | tee "$OUT/gpu.log"
    exit 2
fi
[ "${1:-}" = "--check-wheels" ] && { echo "wheels: all ${#WHEELS[@]} present"; exit 0; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device')" \
    2>&1 | tee -a "$OUT/gpu.log" || exit 2
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
# the budget counts from this script's start (installing and importing take part of it)
python3 benchmarks/gpu.py --json "$OUT/gpu.json" --budget-s "$((BUDGET_S - SECONDS))" "$@" 2>&1 | tee -a "$OUT/gpu.log"

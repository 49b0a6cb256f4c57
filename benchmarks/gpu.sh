#!/usr/bin/env bash
# The GPU benchmark, ready to run on a lent H100/H200: installs nothing, ends in under 8 minutes.
#
#   bash benchmarks/gpu.sh OUT_DIR [extra gpu_benchmark.py options]
#
# Needs torch with CUDA, transformers and diffusers importable (tomesd and scikit-image are
# optional). The device image has torch and transformers only; carry the pure-Python wheels
# of diffusers and tomesd (see benchmarks/README.md) and put them on PYTHONPATH first.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR}"
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu_device.txt" 2>/dev/null || true
timeout 470 python3 benchmarks/gpu_benchmark.py --out "$out" "$@" 2>&1 | tee "$out/gpu_log.txt"

#!/usr/bin/env bash
# The GPU benchmark, ready to run on a lent H100/H200: installs nothing, ends in under 6 minutes.
#
#   bash benchmarks/gpu.sh OUT_DIR [extra gpu_benchmark.py options, e.g. --mame-variant min_tokens=4096]
#
# Writes OUT_DIR/gpu.json and gpu.md (rewritten after every section), gpu_log.txt (this
# run's output) and gpu_device.txt (nvidia-smi). gpu_benchmark.py keeps to its --budget
# (330 s by default: it skips the sections that would not fit and stops itself at the
# budget's end); the `timeout` below is only the hard stop behind it.
#
# Needs torch with CUDA, transformers and diffusers importable (tomesd and scikit-image are
# optional). The device image has torch and transformers only; carry the pure-Python wheels
# of diffusers and tomesd (see benchmarks/README.md) and put them on PYTHONPATH first.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [gpu_benchmark.py options]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the run happens from the repository root
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    echo
    nvidia-smi
} > "$out/gpu_device.txt" 2>&1 || echo "nvidia-smi not available" >> "$out/gpu_device.txt"
timeout -k 5 350 python3 benchmarks/gpu_benchmark.py --out "$out" "$@" 2>&1 | tee "$out/gpu_log.txt"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu.sh: the hard time limit stopped the benchmark; $out/gpu.md holds the sections that ended" | tee -a "$out/gpu_log.txt"
fi
exit "$status"

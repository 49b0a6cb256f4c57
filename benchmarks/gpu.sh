#!/usr/bin/env bash
# The GPU benchmark, one command for a lent H100/H200 (benchmarks/README.md, "On a lent GPU
# machine"): the fused kernels' tests on CUDA, then SD 2.1 and SDXL UNets eager and replayed from
# CUDA graphs, diffusion transformers (PixArt, SD3, Flux at 512/1024, Wan 480p 9/33 frames: one
# forward, real widths with a few blocks, stock vs MaMe defaults vs merging every call vs a ToMe
# bipartite peer; about 90 s), then the UNet compiled. Installs nothing; ends within 565 s (the
# lent machine's command limit is 600 s, and the wheels' install comes before it).
#
#   bash benchmarks/gpu.sh OUT_DIR [gpu_benchmark.py options, e.g. --only "kernel tests,768 b2"]
#
# Writes OUT_DIR/gpu.json and gpu.md (rewritten after every section), kernel_tests.txt
# (pytest's output), gpu_log.txt (this run's output) and gpu_device.txt (nvidia-smi).
# gpu_benchmark.py keeps to its --budget (540 s from its start: it skips the sections that
# would not fit and stops itself at the budget's end); the `timeout` below (GPU_TIME_LIMIT
# seconds) is only the hard stop behind it. MAME_COMMIT names the commit where the tree has
# no git history (a lent machine's copy); gpu.json also holds a digest of the sources.
#
# Needs torch with CUDA, triton, pytest, diffusers and transformers importable (tomesd and
# scikit-image are optional). Check it anywhere: bash benchmarks/gpu.sh /tmp/gpu --quick --device cpu
# (the DiT sections alone, tiny, in seconds: add --only dit).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [gpu_benchmark.py options]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the run happens from the repository root
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, never Triton's interpreter
{
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    echo
    timeout 20 nvidia-smi
} > "$out/gpu_device.txt" 2>&1 || echo "nvidia-smi not available" >> "$out/gpu_device.txt"
timeout -k 5 "${GPU_TIME_LIMIT:-565}" python3 benchmarks/gpu_benchmark.py --out "$out" "$@" 2>&1 | tee "$out/gpu_log.txt"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu.sh: the hard time limit stopped the benchmark; $out/gpu.md holds the sections that ended" | tee -a "$out/gpu_log.txt"
fi
exit "$status"

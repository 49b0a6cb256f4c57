#!/usr/bin/env bash
# The first GPU run of the fused Triton kernels (MaMeConfig(backend="triton")): check them on
# CUDA against the torch path, then time them where they should matter. Installs nothing
# (carry the wheels as for gpu.sh, benchmarks/README.md); under 10 minutes on an H200 (the
# tests up to 4, the benchmark up to 6).
#
#   bash benchmarks/gpu_triton.sh OUT_DIR [extra gpu_benchmark.py options]
#
# Writes OUT_DIR/kernels_tests.txt (tests/test_kernels.py on CUDA: compiled kernels, not the
# interpreter) and what gpu.sh writes, for the sections in $SECTIONS: the operator (the
# kernels' plan + merge and a whole self-attention), SD 2.1 768 and 1024 and SDXL 1024 at
# batch 2, eager and recorded into CUDA graphs, where the "MaMe triton, merging every call"
# column sits beside the torch path's. The kernels inside a compiled graph, if time is left
# (about 4 minutes):
#
#   SECTIONS="compiled MaMe,compiled stock" bash benchmarks/gpu_triton.sh OUT_DIR/compiled \
#       --compile-mame backend=triton,min_latent_tokens=0
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_triton.sh OUT_DIR [gpu_benchmark.py options]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SECTIONS="${SECTIONS:-operator,SD 2.1 768 b2,SD 2.1 1024 b2,SDXL 1024 b2}"

# The ahead-of-time compile test is left out: it checks on a CPU what this GPU runs for real.
timeout -k 5 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not compile_for_gpus" 2>&1 \
    | tee "$out/kernels_tests.txt"
tests=${PIPESTATUS[0]}
bash benchmarks/gpu.sh "$out" --only "$SECTIONS" "$@"
bench=$?
echo "gpu_triton.sh: kernel tests exit $tests, benchmark exit $bench" | tee -a "$out/kernels_tests.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

#!/usr/bin/env bash
# GPU check of the CUDA MoE kernels: every kernel against its CPU reference on fresh random
# inputs, then the benchmark table (Hy3 shapes) -- see crates/kernels/examples/gpu_check.rs.
#
# Two ways to run it:
#   scripts/gpu-check.sh build          # here (no GPU needed): cross-build the stripped binary
#                                       # into .gpu/gpu_check with gpu-run.sh beside it
#   scripts/gpu-check.sh run            # on the GPU machine: run .gpu/gpu_check (a prebuilt
#                                       # binary) or build and run it when cargo+nvcc are there
# The device run used for docs/gpu-results.md:
#   run(carry=[".gpu"], command="bash .gpu/gpu-run.sh .gpu/gpu_check 2>&1 | tee $OUT/gpu-check.log")
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
  build)
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
    ../shared/tools/cuda-cross-build.sh --features cuda --example gpu_check -p switchyard-kernels
    mkdir -p .gpu
    cp "$CARGO_TARGET_DIR/release/examples/gpu_check" .gpu/gpu_check
    strip .gpu/gpu_check
    cp ../shared/tools/gpu-run.sh .gpu/gpu-run.sh
    ls -la .gpu/
    ;;
  run)
    if [ -x .gpu/gpu_check ]; then
      exec bash .gpu/gpu-run.sh .gpu/gpu_check
    fi
    cargo run --release --features cuda --example gpu_check -p switchyard-kernels
    ;;
  *) echo "usage: $0 [build|run]" >&2; exit 2 ;;
esac

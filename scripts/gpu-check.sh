#!/usr/bin/env bash
# GPU check of the CUDA MoE kernels: every kernel against its CPU reference on fresh random
# inputs, then the benchmark table at Hy3 shapes -- see crates/kernels/examples/gpu_check.rs.
#
#   scripts/gpu-check.sh build    # here, no GPU needed: cross-build the stripped binary into
#                                 # .gpu/gpu_check (ignored) with gpu-run.sh beside it
#   scripts/gpu-check.sh run      # on a GPU machine: run .gpu/gpu_check, or build and run it
#                                 # where cargo and nvcc are installed
#   scripts/gpu-check.sh device   # on the lent GPU machine, one session: the full run into
#                                 # $OUT/gpu-check.log, ncu on the expert kernels ($OUT/ncu.txt),
#                                 # memcheck on the quick check ($OUT/memcheck.log)
# The lent-GPU call used for docs/gpu-results.md:
#   run(carry=[".gpu"], command="bash scripts/gpu-check.sh device", timeout_s=420)
# Environment: GPU_CHECK_SEED (repeat a run), GPU_CHECK_QUICK (small T, no benchmark),
# GPU_CHECK_PROFILE (just the expert kernels at Hy3 shapes, for a profiler).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
  build)
    set -e
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
    exec cargo run --release --features cuda --example gpu_check -p switchyard-kernels
    ;;
  device)
    OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
    echo "== full run"
    timeout 240 bash .gpu/gpu-run.sh .gpu/gpu_check > "$OUT/gpu-check.log" 2>&1
    echo "gpu_check exit $?" | tee -a "$OUT/gpu-check.log"
    NVLIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    if [ -n "$NCU" ]; then
      echo "== ncu (profile mode)"
      GPU_CHECK_PROFILE=1 timeout 100 "$NCU" --clock-control none --kernel-name regex:"moe_gemm|moe_gemv" \
        --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats .gpu/gpu_check > "$OUT/ncu.txt" 2>&1
      echo "ncu exit $?" >> "$OUT/ncu.txt"
    fi
    CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$CS" ]; then
      echo "== memcheck (quick mode)"
      GPU_CHECK_QUICK=1 GPU_CHECK_SEED=7 timeout 80 "$CS" --tool memcheck --print-limit 10 \
        .gpu/gpu_check > "$OUT/memcheck.log" 2>&1
      echo "memcheck exit $?" >> "$OUT/memcheck.log"
    fi
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
      > "$OUT/smi.txt" 2>&1
    grep -E "FAIL|error|cannot" "$OUT/gpu-check.log" | head -30
    tail -45 "$OUT/gpu-check.log"
    grep -E "moe_g|Duration|DRAM Throughput|Achieved Occupancy" "$OUT/ncu.txt" 2>/dev/null | head -60
    tail -4 "$OUT/memcheck.log" 2>/dev/null
    ;;
  *) echo "usage: $0 [build|run|device]" >&2; exit 2 ;;
esac

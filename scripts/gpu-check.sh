#!/usr/bin/env bash
# GPU check of the CUDA kernels and the model on the GPU:
#  - gpu_check (crates/kernels/examples/gpu_check.rs): every kernel (MoE gate/dispatch/experts,
#    paged attention and the KV write) against its CPU reference on fresh random inputs, then
#    the benchmark tables at Hy3 shapes;
#  - gpu_oracle (crates/model/examples/gpu_oracle.rs): the tiny hy_v3 transformers oracles
#    (crates/model/tests/fixtures/oracle, tracked files) run by HyV3Model on the GPU, f32 and
#    bf16, contiguous and paged;
#  - the `switchyard` binary itself on the GPU (scripts/gpu-serve-check.sh): generate vs the CPU,
#    serve (chat, SSE, 16 concurrent requests), bench tok/s.
#
#   scripts/gpu-check.sh build    # here, no GPU needed: cross-build the three binaries, strip and
#                                 # gzip them into .gpu/ (ignored) with gpu-run.sh beside them.
#                                 # gzip: the device tool carries 64 MiB with the tracked tree
#                                 # (~11 MB); gpu_check and gpu_oracle are 43 + 47 MB stripped,
#                                 # 11 + 12 MB gzipped (most of it is candle's PTX text)
#   scripts/gpu-check.sh run      # on a GPU machine: unpack and run both from .gpu/, or build and
#                                 # run them where cargo and nvcc are installed
#   scripts/gpu-check.sh device   # on the lent GPU machine, one session (~8 min at most): the
#                                 # full check into $OUT/gpu-check.log, the oracle
#                                 # ($OUT/gpu-oracle.log), ncu on the expert and paged-attention
#                                 # kernels ($OUT/ncu.txt), memcheck on the quick check
#                                 # ($OUT/memcheck.log); prints the results tables last
# The lent-GPU call (its timeout covers the five steps' own timeouts, 540 s, plus start-up):
#   run(carry=[".gpu"], command="bash scripts/gpu-check.sh device", timeout_s=590)
# Environment: GPU_CHECK_SEED (repeat a run), GPU_CHECK_QUICK (small sizes, no benchmark),
# GPU_CHECK_PROFILE (just paged attention at 32K and the expert kernels at Hy3 shapes, for a
# profiler).
set -uo pipefail
cd "$(dirname "$0")/.."
BINS="gpu_check gpu_oracle switchyard"

# Unpacks .gpu/*.gz into $BIN (outside the tree, which may be read-only or carried back).
unpack() {
  BIN=${TMPDIR:-/tmp}/switchyard-gpu
  mkdir -p "$BIN"
  for b in $BINS; do
    gzip -dc ".gpu/$b.gz" > "$BIN/$b" && chmod +x "$BIN/$b" || return 1
  done
}

case "${1:-run}" in
  build)
    set -e
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
    ../shared/tools/cuda-cross-build.sh --features cuda --example gpu_check -p switchyard-kernels
    ../shared/tools/cuda-cross-build.sh --features cuda --example gpu_oracle -p switchyard-model
    ../shared/tools/cuda-cross-build.sh --features cuda --bin switchyard -p switchyard-server
    mkdir -p .gpu
    for b in $BINS; do
      src="$CARGO_TARGET_DIR/release/examples/$b"
      [ -f "$src" ] || src="$CARGO_TARGET_DIR/release/$b"
      cp "$src" ".gpu/$b"
      strip ".gpu/$b"
      ls -la ".gpu/$b"
      gzip -9f ".gpu/$b"
    done
    cp ../shared/tools/gpu-run.sh .gpu/gpu-run.sh
    ls -la .gpu/
    du -sh .gpu
    ;;
  run)
    if [ -f .gpu/gpu_check.gz ] && [ -f .gpu/gpu_oracle.gz ] && [ -f .gpu/switchyard.gz ] && unpack; then
      bash .gpu/gpu-run.sh "$BIN/gpu_check"; rc=$?
      bash .gpu/gpu-run.sh "$BIN/gpu_oracle" crates/model/tests/fixtures/oracle || rc=$((rc ? rc : $?))
      bash scripts/gpu-serve-check.sh "$BIN/switchyard" || rc=$((rc ? rc : $?))
      exit "$rc"
    fi
    cargo run --release --features cuda --example gpu_check -p switchyard-kernels; rc=$?
    cargo run --release --features cuda --example gpu_oracle -p switchyard-model || rc=$((rc ? rc : $?))
    cargo build --release --features cuda -p switchyard-server || rc=$((rc ? rc : $?))
    bash scripts/gpu-serve-check.sh target/release/switchyard || rc=$((rc ? rc : $?))
    exit "$rc"
    ;;
  device)
    OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
    unpack || { echo "cannot unpack .gpu/*.gz (run scripts/gpu-check.sh build, carry .gpu)"; exit 2; }
    echo "== full run"
    timeout 240 bash .gpu/gpu-run.sh "$BIN/gpu_check" > "$OUT/gpu-check.log" 2>&1
    echo "gpu_check exit $?" | tee -a "$OUT/gpu-check.log"
    echo "== tiny hy_v3 oracle"
    timeout 60 bash .gpu/gpu-run.sh "$BIN/gpu_oracle" crates/model/tests/fixtures/oracle \
      > "$OUT/gpu-oracle.log" 2>&1
    echo "gpu_oracle exit $?" | tee -a "$OUT/gpu-oracle.log"
    echo "== switchyard on the GPU"
    WORK=${TMPDIR:-/tmp}/switchyard-serve-check timeout 100 bash scripts/gpu-serve-check.sh \
      "$BIN/switchyard" > "$OUT/gpu-serve.log" 2>&1
    echo "gpu-serve-check exit $?" | tee -a "$OUT/gpu-serve.log"
    NVLIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -n "$NCU" ]; then
      echo "== ncu (profile mode)"
      # Profile mode launches paged attention first (2 matching launches), then the experts
      # (2 calls each of GEMV, GEMV-atomic, GEMV-rows at T=1 and tiled at T=256: 16 launches).
      GPU_CHECK_PROFILE=1 timeout 80 "$NCU" --clock-control none \
        --kernel-name regex:"moe_gemm|moe_gemv|paged_attn_bf16" --launch-count 18 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats "$BIN/gpu_check" > "$OUT/ncu.txt" 2>&1
      echo "ncu exit $?" >> "$OUT/ncu.txt"
    fi
    CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$CS" ]; then
      echo "== memcheck (quick mode)"
      GPU_CHECK_QUICK=1 GPU_CHECK_SEED=7 timeout 60 "$CS" --tool memcheck --print-limit 10 \
        "$BIN/gpu_check" > "$OUT/memcheck.log" 2>&1
      echo "memcheck exit $?" >> "$OUT/memcheck.log"
    fi
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
      > "$OUT/smi.txt" 2>&1
    # Summaries first, the results tables last (the device tool keeps the output's tail).
    echo "== failures"
    grep -E "FAIL|error|cannot" "$OUT/gpu-check.log" | head -30
    echo "== oracle"
    grep -E "PASS|FAIL|gpu_oracle|cannot" "$OUT/gpu-oracle.log" | cut -c1-170 | head -40
    echo "== ncu"
    grep -E "moe_g|paged_attn|Duration|DRAM Throughput|Achieved Occupancy|Waves Per SM" "$OUT/ncu.txt" 2>/dev/null | head -90
    echo "== memcheck"
    tail -4 "$OUT/memcheck.log" 2>/dev/null
    echo "== switchyard on the GPU"
    cut -c1-200 "$OUT/gpu-serve.log"
    echo "== tables"
    if grep -q "^Results (" "$OUT/gpu-check.log"; then
      sed -n '/^Results (/,$p' "$OUT/gpu-check.log"
    else
      tail -45 "$OUT/gpu-check.log"
    fi
    ;;
  *) echo "usage: $0 [build|run|device]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Regenerates the checked-in PTX under kernels/ptx/ from kernels/*.cu (the fallback that
# crates/kernels/build.rs uses when the `cuda` feature is on but no nvcc is found), and checks
# that ptxas accepts each module for sm_90 (H100/H200), printing registers / shared memory /
# spills. Flags must match NVCC_FLAGS in crates/kernels/build.rs.
#
# nvcc comes from NVCC, PATH, or the CUDA 13.0 pip toolchain of ../shared/tools/cuda-cross-build.sh
# (nvcc 13.0 emits PTX ISA 9.0, the newest driver 580 accepts).
# Usage, from the project root:  scripts/build-ptx.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  if [ -f ../shared/tools/cuda-cross-build.sh ]; then
    # shellcheck disable=SC1091
    source ../shared/tools/cuda-cross-build.sh --env-only
  fi
fi
NVCC=${NVCC:-$(command -v nvcc)}
PTXAS=$(dirname "$NVCC")/ptxas
mkdir -p kernels/ptx
for cu in kernels/*.cu; do
  m=$(basename "$cu" .cu)
  "$NVCC" --ptx -arch=sm_90 -O3 -std=c++17 -o "kernels/ptx/$m.ptx" "$cu"
  echo "== $m: $(grep -m1 '^.version' "kernels/ptx/$m.ptx") $(grep -m1 '^.target' "kernels/ptx/$m.ptx")"
  "$PTXAS" -arch=sm_90 -O3 -v "kernels/ptx/$m.ptx" -o /dev/null 2>&1 \
    | grep -E "Compiling entry|registers|spill" | sed 's/^ptxas info    : /  /'
done

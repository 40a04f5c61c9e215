#!/usr/bin/env bash
# Checks the decode GEMV kernels of kernels/moe_experts.cu without a GPU: compiles section (a)
# of the file (everything before the tiled wmma kernels, which host C++ cannot build) as host
# C++ with kernels/emu/moe_gemv_emu.cpp (every CUDA thread a coroutine; barriers block-wide,
# shuffles and ballots warp-wide) and compares with a naive f64 reference: the persistent
# moe_gemv_gate_up_rows{1,2,4,8} at grid sizes from 1 block to more warps than items (act
# within rel 1e-5 and bit-identical to moe_gemv_gate_up, nothing unwritten or stray), and the
# whole GEMV path through moe_gemv_down and moe_gemv_down_atomic (y within rel 5e-3), T = 1..8.
# Catches indexing, work-split and dedup bugs; code generation, timing and the memory model
# need the GPU (scripts/gpu-check.sh). Needs g++ (C++17).
# Usage, from the project root: scripts/emulate-moe-gemv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Section (a): from the top up to the "(b) tiled grouped GEMMs" banner, without the CUDA
# includes and the wmma namespace.
awk '/^\/\/ \(b\) tiled grouped GEMMs/ { exit } { print }' kernels/moe_experts.cu \
  | sed -e '/^#include </d' -e '/^using namespace nvcuda;/d' > "$TMP/experts_gemv_emu.inc"
grep -q 'moe_gemv_gate_up_rows8' "$TMP/experts_gemv_emu.inc" \
  || { echo "emulate-moe-gemv: section (a) of kernels/moe_experts.cu not found" >&2; exit 2; }
# -fno-strict-aliasing: the kernels pun uint4 as bf16 pairs, as CUDA allows.
g++ -std=c++17 -O2 -fno-strict-aliasing -w -I"$TMP" -o "$TMP/emu" kernels/emu/moe_gemv_emu.cpp
"$TMP/emu"

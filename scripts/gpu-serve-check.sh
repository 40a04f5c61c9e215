#!/usr/bin/env bash
# The real `switchyard` binary (built with --features cuda) on a GPU machine: what a user runs,
# not just the kernels. Called by `scripts/gpu-check.sh device`; prints one line per check
# (PASS/FAIL/NOTE) and a bench table last.
#  1. generate on the tiny test model: CPU f32 vs `--device cuda` f32 greedy ids (equal expected:
#     the CUDA f32 path is the CUDA gate with the reference expert GEMMs), and bf16 on the GPU
#     (the CUDA gate, dispatch and expert kernels, paged attention on the device); MTP drafts
#     (`--speculative-config` method mtp, the MTP layer's KV as one more paged layer) give the
#     same greedy ids as no drafts on the GPU;
#  2. serve on the GPU: /health, a chat completion, an SSE stream, 16 concurrent requests, then
#     /metrics shows 0 KV blocks in use;
#  3. bench on the small preset in bf16 at batch 1, 8 and 32 (tok/s through the engine), then
#     8 sequences of 2048 tokens with a bf16 and an FP8 KV cache.
# Usage: scripts/gpu-serve-check.sh /path/to/switchyard   (env PORT, WORK; DEVICE=cpu tries the
# script itself on a machine without a GPU)
set -uo pipefail
SY=${1:?usage: $0 /path/to/switchyard}
RUN="bash $(dirname "$0")/../.gpu/gpu-run.sh"
[ -f "$(dirname "$0")/../.gpu/gpu-run.sh" ] || RUN=""
WORK=${WORK:-${TMPDIR:-/tmp}/switchyard-serve-check}
PORT=${PORT:-18765}
DEV=${DEVICE:-cuda}
mkdir -p "$WORK"
fail=0
pass() { echo "PASS $*"; }
failed() { echo "FAIL $*"; fail=1; }

$RUN "$SY" make-test-model --preset tiny --seed 7 --out "$WORK/tiny" >/dev/null 2>&1 \
  || { failed "make-test-model tiny"; exit 1; }
$RUN "$SY" make-test-model --preset small --dtype bf16 --seed 7 --out "$WORK/small" >/dev/null 2>&1 \
  || failed "make-test-model small"

gen() { $RUN "$SY" generate --model "$WORK/tiny" --input-ids 5,9,13,2,77,31 --max-tokens 24 --json "$@" 2>"$WORK/gen.err" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["generated_ids"])' 2>/dev/null; }
cpu=$(gen --device cpu --dtype f32)
gpu=$(gen --device "$DEV" --dtype f32)
if [ -z "$gpu" ]; then failed "generate --device $DEV f32: $(tail -3 "$WORK/gen.err")"
elif [ "$cpu" = "$gpu" ]; then pass "generate f32: $DEV greedy ids equal the CPU's ($gpu)"
else echo "NOTE generate f32 differs (near-tied logits on a random model?): cpu $cpu $DEV $gpu"; fi
bf=$(gen --device "$DEV" --dtype bf16)
cpubf=$(gen --device cpu --dtype bf16)
if [ -n "$bf" ]; then pass "generate bf16 on $DEV ran: $bf (CPU bf16: $cpubf)"
else failed "generate --device $DEV bf16: $(tail -3 "$WORK/gen.err")"; fi

$RUN "$SY" make-test-model --preset tiny --seed 7 --mtp-layers 1 --out "$WORK/tiny-mtp" >/dev/null 2>&1 \
  || failed "make-test-model tiny --mtp-layers 1"
mtpgen() { $RUN "$SY" generate --model "$WORK/tiny-mtp" --device "$DEV" --dtype bf16 --input-ids 5,9,13,2,77,31 \
  --max-tokens 24 --ignore-eos --json "$@" 2>"$WORK/gen.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generated_ids"])' 2>/dev/null; }
plain=$(mtpgen)
mtp=$(mtpgen --speculative-config '{"method":"mtp","num_speculative_tokens":1}')
if [ -z "$mtp" ]; then failed "generate with MTP drafts on $DEV: $(tail -3 "$WORK/gen.err")"
elif [ "$mtp" = "$plain" ]; then pass "MTP drafts on $DEV: greedy ids equal no drafts ($mtp)"
else echo "NOTE MTP drafts on $DEV differ from no drafts (bf16 ties?): $plain vs $mtp"; fi

$RUN "$SY" serve --model "$WORK/tiny" --device "$DEV" --port "$PORT" --max-model-len 512 \
  > "$WORK/serve.log" 2>&1 &
SPID=$!
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then
  pass "serve --device $DEV answers /health ($(sed 's/\x1b\[[0-9;]*m//g' "$WORK/serve.log" | grep -o 'KV cache allocated.*' | head -1))"
  body='{"model":"local","messages":[{"role":"user","content":"hello"}],"max_tokens":16,"temperature":0}'
  r=$(curl -s -w '\n%{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d "$body")
  [ "$(echo "$r" | tail -1)" = 200 ] && pass "chat completion: $(echo "$r" | head -1 | cut -c1-160)" \
    || failed "chat completion: $r"
  s=$(curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d "${body%\}},\"stream\":true}")
  echo "$s" | grep -q 'data: \[DONE\]' && pass "SSE stream ends with [DONE] ($(echo "$s" | grep -c '^data:') events)" \
    || failed "SSE stream: $(echo "$s" | tail -3)"
  codes=$(for i in $(seq 1 16); do
    curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$PORT/v1/chat/completions" \
      -H 'content-type: application/json' \
      -d "{\"model\":\"local\",\"messages\":[{\"role\":\"user\",\"content\":\"count $i\"}],\"max_tokens\":32}" &
  done; wait)
  ok=$(echo "$codes" | grep -c '^200$')
  [ "$ok" = 16 ] && pass "16 concurrent requests: 16 × 200" || failed "16 concurrent requests: $(echo $codes)"
  used=$(curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^switchyard_kv_cache_blocks_used ' | awk '{print $2}')
  [ "${used:-x}" = 0 ] && pass "KV blocks in use afterwards: 0" || echo "NOTE KV blocks in use afterwards: ${used:-unknown}"
else
  failed "serve --device $DEV did not come up: $(tail -5 "$WORK/serve.log")"
fi
kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null

echo "bench: small preset bf16 on $DEV, prompt 128, gen 32"
printf '%-6s %-14s %-14s %-10s\n' batch prefill_tok_s decode_tok_s ttft_ms
for b in ${BENCH_BATCHES:-1 8 32}; do
  j=$($RUN "$SY" bench --model "$WORK/small" --device "$DEV" --dtype bf16 --prompt-len 128 --gen-len 32 \
    --batch "$b" --json 2>"$WORK/bench.err" | tail -1)
  echo "$j" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%-6d %-14.1f %-14.1f %-10.1f" % (j["batch"], j["prefill_tok_s"], j["decode_tok_s"], j["ttft_ms"]))' 2>/dev/null \
    || failed "bench batch $b: $(tail -3 "$WORK/bench.err")"
done
echo "bench: small preset bf16 on $DEV with an FP8 KV cache (--kv-cache-dtype fp8), prompt 2048, gen 32"
printf '%-6s %-8s %-14s %-14s %-10s\n' batch kv prefill_tok_s decode_tok_s ttft_ms
for kv in bf16 fp8; do
  j=$($RUN "$SY" bench --model "$WORK/small" --device "$DEV" --dtype bf16 --kv-cache-dtype "$kv" \
    --prompt-len 2048 --gen-len 32 --batch 8 --json 2>"$WORK/bench.err" | tail -1)
  echo "$j" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%-6d %-8s %-14.1f %-14.1f %-10.1f" % (j["batch"], j["kv_dtype"], j["prefill_tok_s"], j["decode_tok_s"], j["ttft_ms"]))' 2>/dev/null \
    || failed "bench kv $kv: $(tail -3 "$WORK/bench.err")"
done
exit "$fail"

#!/usr/bin/env bash
# The server under steady load on a GPU, one setting against others, in one command for
# a short GPU slot:
#   1. a random PRESET checkpoint (opt-2.7b shapes, fp16; or CK, an existing one),
#      exported with --target cuda --dtype fp16;
#   2. scripts/serve_load at CLIENTS (default 8,32,32: the second 32-client round finds
#      every batch width and encoder shape already seen), every answer NEW_TOKENS tokens,
#      once for each `--admit-wait-ms` of ADMIT_WAITS (default "0 20 50"), each table
#      followed by where the engine thread's time went (admissions and decode steps);
#   3. scripts/gpu_check.py (tokens against transformers' recorded ones, first MAX_CASES
#      cases a fixture).
# Each step has a time limit cut to a budget of BUDGET_S (300 s); results land in OUT
# (default /tmp/gpu-serve-ab): summary.md and each step's log.
#
#   scripts/gpu_serve_ab.sh [OUT]
#
# Environment: BIN (release blip2-ort), EP (serve profile, default cuda-graph), PRESET,
# CK, CLIENTS, PER_CLIENT (default 12), NEW_TOKENS (20), ADMIT_WAITS, MAX_CASES (6),
# CONFIG (a --config overlay for every run, e.g. one setting conv_algo_search), PYTHON.
# EP=cpu CK=tests/fixtures/opt-tiny/checkpoint checks the script itself on any machine.
# Run on an H200 on 2026-12-04 with the default search against conv_algo_search =
# "heuristic" (docs/serving.md, "Steady load on an H200").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-serve-ab}
BIN=${BIN:-target/release/blip2-ort}
EP=${EP:-cuda-graph}
PRESET=${PRESET:-opt-2.7b}
CLIENTS=${CLIENTS:-8,32,32}
PER_CLIENT=${PER_CLIENT:-12}
NEW_TOKENS=${NEW_TOKENS:-20}
ADMIT_WAITS=${ADMIT_WAITS:-0 20 50}
MAX_CASES=${MAX_CASES:-6}
PYTHON=${PYTHON:-python3}
export BLIP2_ORT_CONFIG=${CONFIG:-}
source scripts/gpu_common.sh
slot_begin "${BUDGET_S:-300}"
: >"$OUT/summary.md"
command -v nvidia-smi >/dev/null && say "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1)"
say "binary: $("$BIN" --version 2>&1), $(date -u +%FT%TZ), serve --ep $EP${CONFIG:+, config $CONFIG}"

ck=${CK:-}
if [ -z "$ck" ]; then
  ck="$OUT/ck"
  timeout "$(limit 90)" "$PYTHON" scripts/random_checkpoint.py "$PRESET" "$ck" --dtype float16 >"$OUT/ck.log" 2>&1 \
    || { say "checkpoint failed: $(tail -n 3 "$OUT/ck.log")"; exit 1; }
fi
ex="$OUT/export"; rm -rf "$ex"
timeout "$(limit 90)" "$BIN" export "$ck" -o "$ex" --target cuda --dtype fp16 --quiet >"$OUT/export.log" 2>&1 \
  || { say "export failed: $(tail -n 3 "$OUT/export.log")"; exit 1; }

for w in $ADMIT_WAITS; do
  say ""; say "### serve --ep $EP --max-batch 32 --admit-wait-ms $w"
  SERVE_FLAGS="--ep $EP --max-batch 32 --admit-wait-ms $w" BIN="$BIN" SERVE_START_TIMEOUT=120 \
    timeout "$(limit 80)" scripts/serve_load "$ex" --clients "$CLIENTS" --requests-per-client "$PER_CLIENT" \
    --warmup 2 --max-tokens "$NEW_TOKENS" --min-tokens "$NEW_TOKENS" --unique-images 200 --label "admit-wait-$w" \
    --json "$OUT/serve-admit-wait-$w.json" >"$OUT/serve-admit-wait-$w.log" 2>&1
  say "exit $?"; grep -E '^(\||Where)' "$OUT/serve-admit-wait-$w.log" >>"$OUT/summary.md"
done

graph_ep=$([ "$EP" = cpu ] && echo "" || echo cuda-graph)
base_ep=$([ "$EP" = cpu ] && echo cpu || echo cuda)
say ""; say "### tokens (scripts/gpu_check.py, first $MAX_CASES cases a fixture)"
timeout "$(limit 100)" "$PYTHON" scripts/gpu_check.py --bin "$BIN" --ep "$base_ep" \
  --graph-ep "$graph_ep" --out "$OUT/check" --max-cases "$MAX_CASES" >"$OUT/check.log" 2>&1
say "exit $?: $(grep -E '^gpu check:' "$OUT/check.log" | tail -n 1)"
grep -E "^FAILED" "$OUT/check.log" | head -n 5 | cut -c1-200 >>"$OUT/summary.md"
echo; cat "$OUT/summary.md"

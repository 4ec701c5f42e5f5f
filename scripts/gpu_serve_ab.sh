#!/usr/bin/env bash
# The server under steady load on a GPU, with ONNX Runtime's default cuDNN convolution
# search and with conv_algo_search = "heuristic", in one command for a short GPU slot:
#   1. a random PRESET checkpoint (opt-2.7b shapes, fp16; or CK, an existing one),
#      exported with --target cuda --dtype fp16;
#   2. scripts/serve_load at CLIENTS (default 8,32,32: the second 32-client round finds
#      every batch width and encoder shape already seen), every answer NEW_TOKENS tokens,
#      once with the profile as it is (exhaustive search: each new vision-encoder batch
#      size times every cuDNN algorithm on its first run) and once with a --config
#      overlay setting conv_algo_search = "heuristic" on the cuda and cuda-graph profiles;
#   3. scripts/gpu_check.py (tokens against transformers' recorded ones, first MAX_CASES
#      cases a fixture) with that overlay.
# Each step has a time limit cut to a budget of BUDGET_S (300 s); results land in OUT
# (default /tmp/gpu-serve-ab): summary.md and each step's log.
#
#   scripts/gpu_serve_ab.sh [OUT]
#
# Environment: BIN (release blip2-ort), EP (serve profile, default cuda-graph), PRESET,
# CK, CLIENTS, PER_CLIENT (default 12), NEW_TOKENS (20), MAX_CASES (6), PYTHON.
# EP=cpu CK=tests/fixtures/opt-tiny/checkpoint checks the script itself on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-serve-ab}
BIN=${BIN:-target/release/blip2-ort}
EP=${EP:-cuda-graph}
PRESET=${PRESET:-opt-2.7b}
CLIENTS=${CLIENTS:-8,32,32}
PER_CLIENT=${PER_CLIENT:-12}
NEW_TOKENS=${NEW_TOKENS:-20}
MAX_CASES=${MAX_CASES:-6}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-300} ))
limit() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
say() { echo "$*" | tee -a "$OUT/summary.md"; }
[ -x "$BIN" ] || { echo "error: $BIN: no blip2-ort binary (cargo build --release, or set BIN)" >&2; exit 1; }
: >"$OUT/summary.md"
command -v nvidia-smi >/dev/null && say "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1)"
say "binary: $("$BIN" --version 2>&1), $(date -u +%FT%TZ), serve --ep $EP"

heuristic="$OUT/heuristic.toml"
printf '[profiles.cuda]\nconv_algo_search = "heuristic"\n\n[profiles.cuda-graph]\nconv_algo_search = "heuristic"\n' >"$heuristic"

ck=${CK:-}
if [ -z "$ck" ]; then
  ck="$OUT/ck"
  timeout "$(limit 90)" "$PYTHON" scripts/random_checkpoint.py "$PRESET" "$ck" --dtype float16 >"$OUT/ck.log" 2>&1 \
    || { say "checkpoint failed: $(tail -n 3 "$OUT/ck.log")"; exit 1; }
fi
ex="$OUT/export"; rm -rf "$ex"
timeout "$(limit 90)" "$BIN" export "$ck" -o "$ex" --target cuda --dtype fp16 --quiet >"$OUT/export.log" 2>&1 \
  || { say "export failed: $(tail -n 3 "$OUT/export.log")"; exit 1; }

load() { # label, config file or empty
  local label=$1 config=$2
  say ""; say "### serve --ep $EP --max-batch 32${config:+, BLIP2_ORT_CONFIG with conv_algo_search = \"heuristic\"}"
  BLIP2_ORT_CONFIG="$config" SERVE_FLAGS="--ep $EP --max-batch 32" BIN="$BIN" SERVE_START_TIMEOUT=120 \
    timeout "$(limit 80)" scripts/serve_load "$ex" --clients "$CLIENTS" --requests-per-client "$PER_CLIENT" \
    --warmup 2 --max-tokens "$NEW_TOKENS" --min-tokens "$NEW_TOKENS" --unique-images 200 --label "$label" \
    --json "$OUT/serve-$label.json" >"$OUT/serve-$label.log" 2>&1
  say "exit $?"; grep -E '^(\||Where)' "$OUT/serve-$label.log" >>"$OUT/summary.md"
}
load exhaustive ""
load heuristic "$heuristic"

graph_ep=$([ "$EP" = cpu ] && echo "" || echo cuda-graph)
base_ep=$([ "$EP" = cpu ] && echo cpu || echo cuda)
say ""; say "### tokens with conv_algo_search = \"heuristic\" (scripts/gpu_check.py, first $MAX_CASES cases a fixture)"
BLIP2_ORT_CONFIG="$heuristic" timeout "$(limit 100)" "$PYTHON" scripts/gpu_check.py --bin "$BIN" --ep "$base_ep" \
  --graph-ep "$graph_ep" --out "$OUT/check" --max-cases "$MAX_CASES" >"$OUT/check.log" 2>&1
say "exit $?: $(grep -E '^gpu check:' "$OUT/check.log" | tail -n 1)"
grep -E "^FAILED" "$OUT/check.log" | head -n 5 | cut -c1-200 >>"$OUT/summary.md"
echo; cat "$OUT/summary.md"

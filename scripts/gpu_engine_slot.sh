#!/usr/bin/env bash
# The engine on a GPU, in one command for a short GPU slot (scripts/gpu_slot.sh checks the
# graphs and single requests; this checks what happens when requests share batches):
#   1. joins: scripts/gpu_serve_check.py: every kind of tiny export served with
#      --max-batch 4; 12 requests alone, then at once and staggered, each answer against
#      its single run, and the server's count of joins;
#   2. throughput: a random PRESET checkpoint (opt-2.7b shapes), exported --target cuda
#      and portable in fp16; `blip2-ort bench` and transformers' generate() at batches 1
#      and 32 (scripts/gpu_compare.sh), then scripts/serve_load against `serve` at 1, 8
#      and 32 clients (--max-batch 32, every answer exactly NEW_TOKENS tokens): the
#      cuda-graph profile (image stage inline, what auto picks) and the portable export on
#      cuda; then the language model's nodes timed at 1
#      and 2 rows with CUDA_LAUNCH_BLOCKING=1 (a decode step of 2 rows costs 3x one of 1
#      on an H200: which kernels);
#   3. tokens: scripts/gpu_check.py on the first MAX_CASES recorded cases (single runs).
# Each step has a time limit, cut to a budget of BUDGET_S (470 s) for the whole, and a
# failed step prints why while the others still run. Results land in OUT
# (default /tmp/gpu-engine-slot): summary.md, and each step's logs and tables.
#
#   scripts/gpu_engine_slot.sh [OUT]
#
# Needs what scripts/gpu_slot.sh needs (a release blip2-ort as BIN, ONNX Runtime's CUDA
# build as ORT_DYLIB_PATH, python3 with torch and transformers for step 3). EP=cpu runs
# steps 1 and 3 on the CPU profile (a check of the script itself) and skips step 2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-engine-slot}
BIN=${BIN:-target/release/blip2-ort}
EP=${EP:-cuda}
PRESET=${PRESET:-opt-2.7b}
MAX_CASES=${MAX_CASES:-6}
NEW_TOKENS=${NEW_TOKENS:-20}
PYTHON=${PYTHON:-python3}
source scripts/gpu_common.sh
slot_begin "${BUDGET_S:-470}"
: >"$OUT/summary.md"
command -v nvidia-smi >/dev/null && say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
say "binary: $("$BIN" --version 2>&1), $(date -u +%FT%TZ)"

graph_ep=$([ "$EP" = cpu ] && echo "" || echo cuda-graph)
say ""; say "## 1. joins (scripts/gpu_serve_check.py --ep $EP ${graph_ep:+--graph-ep $graph_ep})"
timeout "$(limit 120)" "$PYTHON" scripts/gpu_serve_check.py --bin "$BIN" --ep "$EP" ${graph_ep:+--graph-ep "$graph_ep"} \
  --out "$OUT/joins" >"$OUT/joins.log" 2>&1
say "exit $?"; cat "$OUT/joins.log" >>"$OUT/summary.md"; tail -n 20 "$OUT/joins.log"

if [ "$EP" != cpu ]; then

say ""; say "## 2. throughput ($PRESET shapes, fp16, $NEW_TOKENS tokens)"
fig="$OUT/figures"
BIN="$BIN" PYTHON="$PYTHON" BATCHES=1,32 BEAMS= NEW_TOKENS="$NEW_TOKENS" TARGETS="portable cuda-graph" \
  timeout "$(limit 200)" scripts/gpu_compare.sh "$PRESET" "$fig" >"$OUT/figures.log" 2>&1
say "gpu_compare exit $?"; cat "$fig/table.md" >>"$OUT/summary.md" 2>/dev/null
load() { # label, export, serve flags, clients
  local label=$1 ex=$2 flags=$3 clients=$4
  [ -f "$ex/blip2_manifest.json" ] || { say "$label: no export at $ex"; return; }
  say ""; say "### serve: $label (serve $flags)"
  SERVE_FLAGS="$flags" BIN="$BIN" SERVE_START_TIMEOUT=120 timeout "$(limit 90)" scripts/serve_load "$ex" \
    --clients "$clients" --requests-per-client 4 --warmup 2 --max-tokens "$NEW_TOKENS" --min-tokens "$NEW_TOKENS" \
    --unique-images 200 --label "$label" --json "$OUT/serve-${label// /-}.json" >"$OUT/serve-${label// /-}.log" 2>&1
  say "exit $?"; grep -E '^(\||Where)' "$OUT/serve-${label// /-}.log" >>"$OUT/summary.md"
}
load "cuda-graph inline" "$fig/export-cuda" "--ep cuda-graph --max-batch 32 --image-stage inline" 1,8,32
load "portable cuda" "$fig/export-portable" "--ep cuda --max-batch 32" 1,32
# Which kernels a decode step of 2 rows spends its time in, against 1 row: every launch
# waits for its kernel (CUDA_LAUNCH_BLOCKING), so ONNX Runtime's node times are GPU times.
if [ -f "$fig/export-cuda/blip2_manifest.json" ]; then
  say ""; say "### kernels at 1 and 2 rows (CUDA_LAUNCH_BLOCKING=1, --ep cuda, language model)"
  rm -rf "$OUT/profile"
  CUDA_LAUNCH_BLOCKING=1 BLIP2_ORT_PROFILE="$OUT/profile" timeout "$(limit 60)" "$BIN" bench --model "$fig/export-cuda" \
    --ep cuda --batch 1,2 --new-tokens 8 --reps 1 --json >"$OUT/profile-bench.json" 2>"$OUT/profile.log"
  say "exit $?"
  "$PYTHON" scripts/ort_profile_summary.py "$OUT/profile" --by-rows --top 40 >"$OUT/profile.md" 2>&1
  sed -n '/^## language_model/,/^$/p' "$OUT/profile.md" >>"$OUT/summary.md"
fi
else
  say ""; say "(EP=cpu: step 2 skipped)"
fi

say ""; say "## 3. tokens (scripts/gpu_check.py, first $MAX_CASES cases a fixture)"
timeout "$(limit 100)" "$PYTHON" scripts/gpu_check.py --bin "$BIN" --ep "$EP" --graph-ep "$graph_ep" \
  --out "$OUT/check" --max-cases "$MAX_CASES" >"$OUT/check.log" 2>&1
say "exit $?: $(grep -E '^gpu check:' "$OUT/check.log" | tail -n 1)"
grep -E "^FAILED" "$OUT/check.log" | head -n 5 | cut -c1-200 >>"$OUT/summary.md"

echo; cat "$OUT/summary.md"

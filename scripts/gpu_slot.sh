#!/usr/bin/env bash
# Everything a short GPU slot should check, in one command that prints one table:
#   1. probe: the GPU (nvidia-smi), the CUDA libraries ONNX Runtime's CUDA provider needs
#      (ldd), and whether a session starts on the `cuda` and `cuda-graph` profiles (an
#      fp16 --target cuda export of the tiny fixture captioning one photo);
#   2. tokens: scripts/gpu_check.py on the first MAX_CASES recorded cases of each tiny
#      fixture (fp32 portable exact, fp16 --target cuda >= 90%, cuda-graph = cuda);
#   3. figures: scripts/gpu_compare.sh on a random PRESET checkpoint (opt-2.7b shapes by
#      default): portable, --target cuda and cuda-graph against transformers (when torch
#      is there), caption b1, TTFT, ms/token, images/s at b8/b32, beam 5, peak memory.
# Each step has a time limit (probe 1 min a command, tokens 2.5 min, figures 5 min), all
# cut to a budget of 470 s for the whole (BUDGET_S), so it ends within 8 minutes even
# when something hangs; a failed step prints why and the others still run.
#
#   scripts/gpu_slot.sh [OUT]        # default OUT /tmp/gpu-slot; the table is OUT/table.md
#
# Needs: a release blip2-ort (BIN, default target/release/blip2-ort), ONNX Runtime's CUDA
# build (ORT_DYLIB_PATH, or `blip2-ort install-runtime --gpu`), python3; torch and
# transformers (scripts/requirements-fixtures.txt) for steps 3's checkpoint and its
# transformers column. Knobs: PRESET (opt-2.7b), MAX_CASES (6), EP (cuda; EP=cpu checks
# the script itself on any machine: no probe of CUDA, tiny figures), and gpu_compare.sh's
# own (BATCHES, BEAMS, NEW_TOKENS).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-slot}
BIN=${BIN:-target/release/blip2-ort}
EP=${EP:-cuda}
PRESET=${PRESET:-opt-2.7b}
MAX_CASES=${MAX_CASES:-6}
PYTHON=${PYTHON:-python3}
# The whole command stays under 8 minutes: each step's limit is cut to what is left.
source scripts/gpu_common.sh
slot_begin "${BUDGET_S:-470}"
rows=()
row() { rows+=("| $1 | $2 | $3 |"); echo "== $1: $2 ${3:+($3)}"; }
last_line() { tail -n 1 "$1" 2>/dev/null | tr '|' '/' | cut -c1-200; }

# 1. Probe.
if [ "$EP" = cpu ]; then
  row "GPU" "skipped" "EP=cpu"
else
  if gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
    row "GPU" "ok" "$gpu"
  else
    row "GPU" "FAILED" "nvidia-smi: $(echo "$gpu" | head -n 1)"
  fi
  lib=$(dirname "${ORT_DYLIB_PATH:-/nonexistent/x}")/libonnxruntime_providers_cuda.so
  if [ -f "$lib" ]; then
    missing=$(ldd "$lib" 2>&1 | grep "not found" | awk '{print $1}' | tr '\n' ' ')
    if [ -z "$missing" ]; then row "CUDA libraries" "ok" "$lib"; else row "CUDA libraries" "FAILED" "missing: $missing"; fi
  else
    row "CUDA libraries" "FAILED" "no $lib (set ORT_DYLIB_PATH to the CUDA build's libonnxruntime.so)"
  fi
fi
probe="$OUT/probe-export"
if timeout "$(limit 60)" "$BIN" export tests/fixtures/opt-tiny/checkpoint -o "$probe" --dtype fp16 --target cuda --force --quiet \
    >"$OUT/probe-export.log" 2>&1; then
  profiles=$([ "$EP" = cpu ] && echo cpu || echo "cuda cuda-graph")
  for ep in $profiles; do
    if timeout "$(limit 60)" "$BIN" infer --model "$probe" --ep "$ep" caption tests/data/photos/chelsea.png \
        --max-new-tokens 4 >"$OUT/probe-$ep.log" 2>&1; then
      row "session on --ep $ep" "ok" "captioned a photo"
    else
      row "session on --ep $ep" "FAILED" "$(last_line "$OUT/probe-$ep.log")"
    fi
  done
else
  row "probe export" "FAILED" "$(last_line "$OUT/probe-export.log")"
fi

# 2. Tokens on a subset of the recorded cases.
graph_ep=$([ "$EP" = cpu ] && echo "" || echo cuda-graph)
timeout "$(limit 150)" "$PYTHON" scripts/gpu_check.py --bin "$BIN" --ep "$EP" --graph-ep "$graph_ep" \
  --out "$OUT/check" --max-cases "$MAX_CASES" >"$OUT/check.log" 2>&1
status=$?
summary=$(grep -E "^gpu check:" "$OUT/check.log" | tail -n 1)
if [ $status = 0 ]; then
  row "tokens (first $MAX_CASES cases a fixture)" "ok" "$summary"
else
  fails=$(grep -E "^FAILED" "$OUT/check.log" | head -n 3 | cut -c1-160 | tr '\n' ';' | tr '|' '/')
  row "tokens (first $MAX_CASES cases a fixture)" "FAILED" "${summary:-exit $status, timed out or crashed} ${fails}"
fi

# 3. Figures.
if [ "$EP" = cpu ]; then
  export EP DEVICE=cpu DTYPE=fp32 BATCHES=${BATCHES:-1,2} BEAMS=${BEAMS:-2} NEW_TOKENS=${NEW_TOKENS:-4}
  PRESET=small
fi
if BIN="$BIN" PYTHON="$PYTHON" timeout "$(limit 300)" scripts/gpu_compare.sh "$PRESET" "$OUT/figures" >"$OUT/figures.log" 2>&1; then
  row "figures ($PRESET)" "ok" "table below"
else
  row "figures ($PRESET)" "FAILED" "exit $?; $(grep -E "failed|error" "$OUT/figures/log.txt" "$OUT/figures.log" 2>/dev/null | head -n 2 | tr '\n' ';' | tr '|' '/')"
fi

{
  echo "| step | result | detail |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  cat "$OUT/figures/table.md" 2>/dev/null
} >"$OUT/table.md"
echo
cat "$OUT/table.md"

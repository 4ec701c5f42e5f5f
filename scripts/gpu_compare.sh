#!/usr/bin/env bash
# blip2-ort against transformers on a GPU, on a random checkpoint with real shapes, in one
# command: make the checkpoint on the GPU, export it twice with --dtype fp16 (portable
# graphs, and --target cuda), time both with `blip2-ort bench --ep cuda` (and the CUDA
# export once more with --ep cuda-graph, its decode step captured as a CUDA graph; OPT
# presets only), then time transformers' generate() on the same checkpoint, and print
# one table.
#
#   scripts/gpu_compare.sh [PRESET] [OUT]     # PRESET: opt-2.7b (default), opt-6.7b, flan-t5-xl, small
#
# Needs: a blip2-ort binary (BIN, default target/release/blip2-ort), ONNX Runtime's CUDA
# build (`blip2-ort install-runtime --gpu`, or ORT_DYLIB_PATH), and python3 with the
# packages of scripts/requirements-fixtures.txt and a CUDA build of torch. Knobs
# (environment): BATCHES (1,8,32), BEAMS (5; empty skips beam search), NEW_TOKENS (20),
# TARGETS ("portable cuda cuda-graph"; cuda-graph is the cuda export on the cuda-graph
# profile), HF=0 skips transformers, CK=an existing checkpoint folder,
# EP / DEVICE / DTYPE (cuda / cuda / fp16: the same script checks itself on a CPU with
# EP=cpu DEVICE=cpu DTYPE=fp32). Everything lands in OUT (default
# /tmp/gpu-compare): log.txt, ours_<target>_greedy.json, ours_<target>_beam.json,
# hf_greedy.json, hf_beam.json, table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-opt-2.7b}
OUT=${2:-/tmp/gpu-compare}
BIN=${BIN:-target/release/blip2-ort}
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-1,8,32}
BEAMS=${BEAMS-5}
NEW_TOKENS=${NEW_TOKENS:-20}
EP=${EP:-cuda}
# The cuda-graph profile needs CUDA and an OPT export.
case "$PRESET:$EP" in flan-t5*|*:cpu) TARGETS=${TARGETS:-portable cuda} ;; *) TARGETS=${TARGETS:-portable cuda cuda-graph} ;; esac
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp16}
case "$DTYPE" in fp16) TORCH_DTYPE=float16 ;; *) TORCH_DTYPE=float32 ;; esac
CK=${CK:-$OUT/checkpoint}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
[ -x "$BIN" ] || { echo "error: $BIN: no blip2-ort binary (cargo build --release, or set BIN)" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/log.txt" 2>&1

if [ ! -f "$CK/config.json" ]; then
  log "random $PRESET checkpoint ($TORCH_DTYPE)"
  "$PYTHON" scripts/random_checkpoint.py "$PRESET" "$CK" --dtype "$TORCH_DTYPE" >>"$OUT/log.txt" 2>&1 \
    || { echo "error: making the checkpoint failed (see $OUT/log.txt)" >&2; exit 1; }
fi
for target in $TARGETS; do
  # cuda-graph: the --target cuda export on the cuda-graph profile.
  case "$target" in cuda-graph) etarget=cuda; ep=cuda-graph ;; *) etarget=$target; ep=$EP ;; esac
  ex="$OUT/export-$etarget"
  if [ ! -f "$ex/blip2_manifest.json" ] || [ "$target" = "$etarget" ]; then
    log "export --dtype $DTYPE --target $etarget"
    rm -rf "$ex"
    "$BIN" export "$CK" -o "$ex" --dtype "$DTYPE" --target "$etarget" --quiet >>"$OUT/log.txt" 2>&1 || { log "export failed"; continue; }
  fi
  log "blip2-ort bench ($target, --ep $ep), greedy, batches $BATCHES"
  "$BIN" bench --model "$ex" --ep "$ep" --batch "$BATCHES" --new-tokens "$NEW_TOKENS" --json \
    >"$OUT/ours_${target}_greedy.json" 2>>"$OUT/log.txt" || log "bench failed"
  if [ -n "$BEAMS" ]; then
    log "blip2-ort bench ($target, --ep $ep), $BEAMS beams"
    "$BIN" bench --model "$ex" --ep "$ep" --batch 1 --num-beams "$BEAMS" --new-tokens "$NEW_TOKENS" --json \
      >"$OUT/ours_${target}_beam.json" 2>>"$OUT/log.txt" || log "bench failed"
  fi
done
if [ "${HF:-1}" != 0 ]; then
  log "transformers, greedy"
  "$PYTHON" scripts/hf_generate_bench.py "$CK" --device "$DEVICE" --dtype "$TORCH_DTYPE" --batch "$BATCHES" --new-tokens "$NEW_TOKENS" \
    >"$OUT/hf_greedy.json" 2>>"$OUT/log.txt" || log "transformers failed"
  if [ -n "$BEAMS" ]; then
    log "transformers, $BEAMS beams"
    "$PYTHON" scripts/hf_generate_bench.py "$CK" --device "$DEVICE" --dtype "$TORCH_DTYPE" --batch 1 --beams "$BEAMS" --new-tokens "$NEW_TOKENS" \
      >"$OUT/hf_beam.json" 2>>"$OUT/log.txt" || log "transformers failed"
  fi
fi

"$PYTHON" - "$OUT" "$BATCHES" "$TARGETS" <<'PY' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
out, batches, targets = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split()
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return {}
cols = [("transformers", load("hf_greedy.json"), load("hf_beam.json"))]
cols += [(f"blip2-ort {t}", load(f"ours_{t}_greedy.json"), load(f"ours_{t}_beam.json")) for t in targets]
rows = [("caption, batch 1 (ms)", "greedy", "generate_b1_ms"),
        ("time to first token, batch 1 (ms)", "greedy", "ttft_b1_ms"),
        ("decode per token, batch 1 (ms)", "greedy", "decode_ms_per_token_b1"),
        ("vision encoder, batch 1 (ms)", "greedy", "vision_b1_ms")]
rows += [(f"images/s, batch {b}", "greedy", f"images_per_s_b{b}") for b in batches if b != "1"]
rows += [("beam search, batch 1 (ms)", "beam", "generate_b1_ms"),
         ("peak GPU memory, batch 1 (MB)", "greedy", "peak_gpu_mem_MB")]
print("| measure | " + " | ".join(c[0] for c in cols) + " |")
print("| --- |" + " --- |" * len(cols))
for label, which, key in rows:
    cells = []
    for _, greedy, beam in cols:
        v = (greedy if which == "greedy" else beam).get(key)
        cells.append("-" if v is None else f"{v:,.1f}")
    print(f"| {label} | " + " | ".join(cells) + " |")
PY

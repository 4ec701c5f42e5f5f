#!/usr/bin/env bash
# Times blip2-ort against Hugging Face transformers on the same checkpoint, in one run,
# and writes the comparison table into docs/PERFORMANCE.md (between the
# compare_bench markers, so a rerun replaces it).
#
#   scripts/compare_bench.sh CHECKPOINT [--export DIR] [--batch 1,4] [--new-tokens 20]
#       [--threads 2] [--reps 3] [--prompt-tokens 0] [--rounds 1] [--quantize int8|int4]
#       [--quantize-encoders int8]
#       [--label NAME] [--out docs/PERFORMANCE.md] [--no-write]
#
# CHECKPOINT is a Hugging Face BLIP-2 folder (e.g. one made by
# `python scripts/random_checkpoint.py small DIR`). transformers is timed by
# scripts/hf_generate_bench.py ($HF_BENCH overrides it). CHECKPOINT is exported once to --export
# (default target/bench-export/NAME[-QUANT]; an existing export there is reused), with
# `--quantize` / `--quantize-encoders` if given (transformers still runs the fp32 checkpoint). Both sides get
# the same --batch/--new-tokens/--prompt-tokens/--threads/--reps; every generate makes
# exactly --new-tokens tokens. With --rounds K, both sides run K times, alternating, and
# each number is the median over rounds (for noisy, shared machines). The export's .onnx
# files are touched (mtime only) so that its first start, which builds the optimized-graph
# cache, is timed as a real first start.
#
# Python: $PYTHON if set (it must have torch and transformers), else python3 if it has
# them, else a venv in target/bench-venv with torch (CPU) and transformers from pip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS="$*"
HF_BENCH="${HF_BENCH:-$ROOT/scripts/hf_generate_bench.py}"
CHECKPOINT=""
EXPORT=""
BATCH="1,4"
NEW_TOKENS=20
THREADS=2
REPS=3
PROMPT_TOKENS=0
ROUNDS=1
QUANT=""
QENC=""
LABEL=""
OUT="$ROOT/docs/PERFORMANCE.md"
WRITE=1

die() { echo "compare_bench: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --export) EXPORT="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --new-tokens) NEW_TOKENS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --prompt-tokens) PROMPT_TOKENS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --quantize) QUANT="$2"; shift 2 ;;
    --quantize-encoders) QENC="$2"; shift 2 ;;
    --label) LABEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-write) WRITE=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$CHECKPOINT" ] || die "one checkpoint only"; CHECKPOINT="$1"; shift ;;
  esac
done
[ -n "$CHECKPOINT" ] || die "usage: scripts/compare_bench.sh CHECKPOINT [options] (see --help)"
[ -f "$CHECKPOINT/config.json" ] || die "$CHECKPOINT: not a checkpoint folder (no config.json)"
[ -f "$HF_BENCH" ] || die "$HF_BENCH: missing (HF_BENCH names the transformers benchmark; scripts/hf_generate_bench.py by default)"
CHECKPOINT="$(cd "$CHECKPOINT" && pwd)"
NAME="$(basename "$CHECKPOINT")"
SUFFIX="${QUANT:+-$QUANT}${QENC:+-enc$QENC}"
EXPORT="${EXPORT:-$ROOT/target/bench-export/$NAME$SUFFIX}"
LABEL="${LABEL:-$NAME$SUFFIX}"

# ---- Python with torch and transformers -------------------------------------------------
has_torch() { "$1" -c "import torch, transformers" >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  has_torch "$PYTHON" || die "\$PYTHON=$PYTHON has no torch/transformers"
elif has_torch python3; then
  PYTHON=python3
else
  VENV="$ROOT/target/bench-venv"
  if ! [ -x "$VENV/bin/python" ] || ! has_torch "$VENV/bin/python"; then
    echo "creating $VENV with torch (CPU) and transformers" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r "$ROOT/scripts/requirements-fixtures.txt"
  fi
  PYTHON="$VENV/bin/python"
fi

# ---- blip2-ort ----------------------------------------------------------------------------
BIN="${BLIP2_ORT_BIN:-$ROOT/target/release/blip2-ort}"
if [ -z "${BLIP2_ORT_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -p blip2-cli --quiet)
fi
"$BIN" install-runtime --quiet >/dev/null
if ! [ -f "$EXPORT/blip2_manifest.json" ]; then
  echo "exporting $CHECKPOINT to $EXPORT" >&2
  "$BIN" export "$CHECKPOINT" -o "$EXPORT" ${QUANT:+--quantize "$QUANT"} ${QENC:+--quantize-encoders "$QENC"} --quiet >/dev/null
fi

# Others may share the machine (builds): wait, up to two minutes, for the CPUs to be
# quiet before each timed run.
wait_idle() {
  local quiet=0 tries=0 a b
  while [ $quiet -lt 3 ] && [ $tries -lt 120 ]; do
    a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
    local busy=$(( (b[1]+b[2]+b[3]) - (a[1]+a[2]+a[3]) )) idle=$(( (b[4]+b[5]) - (a[4]+a[5]) ))
    if [ $(( idle * 100 / (busy + idle + 1) )) -ge 90 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    tries=$((tries + 1))
  done
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
COMMON=(--batch "$BATCH" --new-tokens "$NEW_TOKENS" --prompt-tokens "$PROMPT_TOKENS" --reps "$REPS" --threads "$THREADS")

# The first start after an export builds the optimized-graph cache: time it on its own.
# Touching the graphs makes it a first start again (the cache is keyed by mtime).
touch "$EXPORT"/*.onnx
wait_idle
echo "blip2-ort: first start" >&2
"$BIN" bench --model "$EXPORT" --batch 1 --new-tokens 2 --reps 1 --threads "$THREADS" --json >"$WORK/first.json"
for r in $(seq 1 "$ROUNDS"); do
  wait_idle
  echo "blip2-ort: round $r/$ROUNDS" >&2
  "$BIN" bench --model "$EXPORT" "${COMMON[@]}" --json >"$WORK/ours.$r.json"
  wait_idle
  echo "transformers: round $r/$ROUNDS" >&2
  "$PYTHON" "$HF_BENCH" "$CHECKPOINT" --batch "$BATCH" --new-tokens "$NEW_TOKENS" --prompt-tokens "$PROMPT_TOKENS" \
    --beams 1 --reps "$REPS" --threads "$THREADS" 2>"$WORK/hf.$r.log" | tail -n 1 >"$WORK/hf.$r.json" \
    || { cat "$WORK/hf.$r.log" >&2; die "hf_generate_bench.py failed"; }
done

TORCH_VERSIONS="$("$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
COMMAND="scripts/compare_bench.sh $ARGS"

python3 - "$WORK" "$ROUNDS" "$BATCH" "$OUT" "$WRITE" "$LABEL" "$TORCH_VERSIONS" "$COMMAND" <<'PY'
import json, os, platform, statistics, sys, time

work, rounds, batch, out, write, label, torch_versions, command = sys.argv[1:9]
rounds, write = int(rounds), write == "1"
batches = [int(b) for b in batch.split(",")]

def load(kind):
    return [json.load(open(os.path.join(work, f"{kind}.{r}.json"))) for r in range(1, rounds + 1)]

def med(objs, key):
    vals = [o[key] for o in objs if isinstance(o.get(key), (int, float))]
    return statistics.median(vals) if vals else None

ours, hf = load("ours"), load("hf")
first = json.load(open(os.path.join(work, "first.json")))

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

def fmt(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"

rows = []
def row(name, key, better, digits=1):
    o, h = med(ours, key), med(hf, key)
    if better == "lower":      # time: speedup = hf / ours
        ratio = "–" if not (o and h) else f"**{h / o:.2f}x** faster" if h >= o else f"**{o / h:.2f}x** slower"
    elif better == "higher":   # throughput
        ratio = f"**{o / h:.2f}x**" if o and h else "–"
    else:                      # memory: ours / hf
        ratio = f"**{o / h:.2f}x** the memory" if o and h else "–"
    rows.append(f"| {name} | {fmt(h, digits)} | {fmt(o, digits)} | {ratio} |")

for b in batches:
    row(f"generate, batch {b} (ms)", f"generate_b{b}_ms", "lower")
    row(f"images/s, batch {b}", f"images_per_s_b{b}", "higher", 2)
row("vision encoder, batch 1 (ms)", "vision_b1_ms", "lower")
row("decode ms/token, batch 1", "decode_ms_per_token_b1", "lower", 2)
row("peak RSS (MB)", "peak_rss_MB", "memory", 0)

extra = [
    ("session start-up, first start after export (ms)", first.get("load_ms")),
    ("session start-up, later starts (ms)", med(ours, "load_ms")),
    ("first generate after start-up, batch 1 (ms)", med(ours, "first_generate_b1_ms")),
    ("Q-Former, batch 1 (ms)", med(ours, "qformer_b1_ms")),
    ("prefill, batch 1 (ms)", med(ours, "prefill_b1_ms")),
    ("one decode step, batch 1 (ms)", med(ours, "decode_step_b1_ms")),
    ("generate, batch 1, image already encoded (ms)", med(ours, "generate_b1_cached_image_ms")),
    ("RSS after loading (MB)", med(ours, "rss_after_load_MB")),
]

o0 = ours[0]
section = [
    f"<!-- compare_bench:{label}:begin (generated by scripts/compare_bench.sh; rerun it to replace) -->",
    f"### {label}: blip2-ort ({o0.get('dtype', '?')}{', ' + o0['quantize'] + ' weights' if o0.get('quantize') else ''}{', ' + o0['quantize_encoders'] + ' encoders' if o0.get('quantize_encoders') else ''}) vs transformers (float32), {o0.get('threads')} threads",
    "",
    f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {cpu_model()}, {os.cpu_count()} logical cores; "
    f"ONNX Runtime {o0.get('ort_version')} (CPU), {torch_versions}. "
    f"{o0.get('new_tokens')} new tokens exactly, {o0.get('prompt_tokens')} prompt tokens after BOS, greedy; "
    f"random pixel values; medians of {o0.get('reps')} runs after a warm-up"
    + (f", then the median of {rounds} alternating rounds" if rounds > 1 else "") + ".",
    "",
    f"    {command}",
    "",
    "| | transformers | blip2-ort | blip2-ort vs transformers |",
    "| --- | ---: | ---: | --- |",
    *rows,
    "",
    "blip2-ort only:",
    "",
    "| | ms / MB |",
    "| --- | ---: |",
    *[f"| {k} | {fmt(v)} |" for k, v in extra if v is not None],
    f"<!-- compare_bench:{label}:end -->",
]
text = "\n".join(section) + "\n"
print(text)
if write:
    begin, end = f"<!-- compare_bench:{label}:begin", f"<!-- compare_bench:{label}:end -->"
    doc = open(out).read() if os.path.exists(out) else "# Performance\n\n"
    if begin in doc and end in doc:
        a = doc.index(begin)
        b = doc.index(end) + len(end)
        doc = doc[:a] + text.rstrip("\n") + doc[b:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    open(out, "w").write(doc)
    print(f"wrote {out}", file=sys.stderr)
PY

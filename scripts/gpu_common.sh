# Sourced by the GPU slot scripts (gpu_slot.sh, gpu_engine_slot.sh, gpu_serve_ab.sh), after
# they set OUT and BIN: `slot_begin SECONDS` checks the binary, makes OUT and starts the
# whole script's budget; `limit N` is a step's timeout, N seconds or what is left of the
# budget when that is less (at least 1), so a slot ends in time even when a step hangs;
# `say TEXT` prints TEXT and appends it to OUT/summary.md.
slot_begin() {
  [ -x "$BIN" ] || { echo "error: $BIN: no blip2-ort binary (cargo build --release, or set BIN)" >&2; exit 1; }
  mkdir -p "$OUT"
  DEADLINE=$(( $(date +%s) + $1 ))
}
limit() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
say() { echo "$*" | tee -a "$OUT/summary.md"; }

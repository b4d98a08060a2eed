#!/usr/bin/env bash
# Set and record the power mode before measuring: nvpmodel (the mode) and jetson_clocks (max clocks).
# Writes OUT/power.txt so a benchmark says what the device was running at.
#   jetson/power.sh [MODE] [--out DIR] [--dry-run]      MODE defaults to 0 (MAXN on AGX Orin)
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: jetson/power.sh [MODE] [--out DIR] [--dry-run]"; }
parse_common_args "$@"
MODE=0
OUT=jetson-results
i=0
while [ "$i" -lt "${#ARGS[@]}" ]; do
  case "${ARGS[$i]}" in
    --out) i=$((i + 1)); OUT=${ARGS[$i]} ;;
    *) MODE=${ARGS[$i]} ;;
  esac
  i=$((i + 1))
done

run mkdir -p "$OUT"
run sudo nvpmodel -m "$MODE"
run sudo jetson_clocks
if [ "$DRY_RUN" -eq 0 ]; then
  { date -u +%FT%TZ; sudo nvpmodel -q; sudo jetson_clocks --show; } > "$OUT/power.txt"
  echo "recorded $OUT/power.txt"
else
  echo "+ (record nvpmodel -q and jetson_clocks --show to $OUT/power.txt)"
fi

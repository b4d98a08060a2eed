#!/usr/bin/env bash
# A measured run on the device: the power mode recorded, tegrastats logged beside the figures, then the
# scripted dialogue with per-turn time to first token, decode speed and KV tokens (JSON).
#   jetson/bench.sh ARTIFACT [--out DIR] [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: jetson/bench.sh ARTIFACT [--out DIR] [--dry-run]"; }
parse_common_args "$@"
OUT=jetson-results
ARTIFACT=""
i=0
while [ "$i" -lt "${#ARGS[@]}" ]; do
  case "${ARGS[$i]}" in
    --out) i=$((i + 1)); OUT=${ARGS[$i]} ;;
    *) ARTIFACT=${ARGS[$i]} ;;
  esac
  i=$((i + 1))
done
[ -n "$ARTIFACT" ] || { usage >&2; exit 2; }
ROOT=$(repo_root)
VENV="$ROOT/.venv-jetson"

run mkdir -p "$OUT"
run sudo nvpmodel -q
if [ "$DRY_RUN" -eq 0 ]; then
  tegrastats --interval 500 --logfile "$OUT/tegrastats.log" &
  TEGRA=$!
  trap 'kill "$TEGRA" 2>/dev/null || true' EXIT
else
  echo "+ tegrastats --interval 500 --logfile $OUT/tegrastats.log &"
fi
run "$VENV/bin/belle-edge" chat "$ARTIFACT" --script "$ROOT/belle_edge/data/demo_dialogue.txt" --json \
  --max-new-tokens 128
echo "figures: the JSON above; power and utilisation: $OUT/tegrastats.log"

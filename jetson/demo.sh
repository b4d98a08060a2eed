#!/usr/bin/env bash
# The on-device chat demo: the scripted Chinese/English dialogue, streamed, with per-turn stats; then an
# interactive chat if --interactive is given.
#   jetson/demo.sh ARTIFACT [--interactive] [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: jetson/demo.sh ARTIFACT [--interactive] [--dry-run]"; }
parse_common_args "$@"
INTERACTIVE=0
ARTIFACT=""
for arg in "${ARGS[@]}"; do
  case "$arg" in
    --interactive) INTERACTIVE=1 ;;
    *) ARTIFACT=$arg ;;
  esac
done
[ -n "$ARTIFACT" ] || { usage >&2; exit 2; }
ROOT=$(repo_root)
VENV="$ROOT/.venv-jetson"

run "$VENV/bin/belle-edge" demo "$ARTIFACT"   # the tea-shop script with its system prompt (cli/chat.py)
if [ "$INTERACTIVE" -eq 1 ]; then
  run "$VENV/bin/belle-edge" chat "$ARTIFACT"
fi

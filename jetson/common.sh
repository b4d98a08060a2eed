#!/usr/bin/env bash
# Shared by the jetson/ scripts: --dry-run handling and a `run` that prints each command it would run.
# Sourced, not run.

DRY_RUN=0
ARGS=()

parse_common_args() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      *) ARGS+=("$arg") ;;
    esac
  done
}

# run CMD...: print it; run it unless --dry-run
run() {
  printf '+ %s\n' "$*"
  if [ "$DRY_RUN" -eq 0 ]; then
    "$@"
  fi
}

# Where build_engine.sh puts our TensorRT plugin library; the runtime finds it through BELLE_EDGE_PLUGIN.
JETSON_PLUGIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/kernels/build-jetson/libbelle_trt_plugin.so"
if [ -z "${BELLE_EDGE_PLUGIN:-}" ] && [ -f "$JETSON_PLUGIN" ]; then
  export BELLE_EDGE_PLUGIN="$JETSON_PLUGIN"
fi

die() {
  printf 'jetson: error: %s\n' "$*" >&2
  exit 2
}

# the repository root (jetson/..), where the venv lives
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

is_jetson() {
  [ -f /etc/nv_tegra_release ]
}

#!/usr/bin/env bash
# Build the TensorRT engine of an artifact compiled on a host (`belle-edge compile --target orin ...`),
# here on the Orin with JetPack's TensorRT: first our plugin library (kernels/, CMake against the system
# TensorRT) when the artifact uses our attention plugin, then the engine (`belle-edge build-engine`).
#   jetson/build_engine.sh ARTIFACT [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: jetson/build_engine.sh ARTIFACT [--dry-run]"; }
parse_common_args "$@"
[ "${#ARGS[@]}" -eq 1 ] || { usage >&2; exit 2; }
ARTIFACT=${ARGS[0]}
ROOT=$(repo_root)
VENV="$ROOT/.venv-jetson"
[ -f "$ARTIFACT/manifest.json" ] || [ "$DRY_RUN" -eq 1 ] || die "$ARTIFACT: not an artifact (no manifest.json)"

if [ -f "$ROOT/kernels/CMakeLists.txt" ]; then
  run cmake -S "$ROOT/kernels" -B "$ROOT/kernels/build-jetson" -DTensorRT_ROOT=/usr -DCMAKE_CUDA_ARCHITECTURES=87
  run cmake --build "$ROOT/kernels/build-jetson" -j "$(nproc)"
else
  echo "note: kernels/CMakeLists.txt not found; only --attention native artifacts can run without it"
fi
run "$VENV/bin/belle-edge" build-engine "$ARTIFACT" --tensorrt tensorrt
run "$VENV/bin/belle-edge" inspect "$ARTIFACT"

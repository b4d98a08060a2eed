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
# weight-only int8/int4 artifacts: model.onnx carries INT8/INT4 initializers + DequantizeLinear -> MatMul,
# which TensorRT's parser takes from 10.0 on (JetPack 6: 10.3); say so, and check it before the long build
PRECISION=""
if [ -f "$ARTIFACT/manifest.json" ]; then
  PRECISION=$(sed -n 's/.*"precision": *"\([a-z0-9]*\)".*/\1/p' "$ARTIFACT/manifest.json" | head -n 1)
fi
if [ "$PRECISION" = int4 ] || [ "$PRECISION" = int8 ]; then
  echo "weights: $PRECISION weight-only (model.onnx: DequantizeLinear -> MatMul, fused by TensorRT's parser)"
  run "$VENV/bin/python" -c "import sys, tensorrt; v = tensorrt.__version__; sys.exit(0 if int(v.split('.')[0]) >= 10 else f'TensorRT {v}: weight-only $PRECISION needs 10.0 or newer')"
fi
run "$VENV/bin/belle-edge" build-engine "$ARTIFACT" --tensorrt tensorrt
run "$VENV/bin/belle-edge" inspect "$ARTIFACT"

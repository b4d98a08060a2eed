#!/usr/bin/env bash
# Install what the runtime needs on a Jetson Orin with JetPack 6.x (CUDA 12.6, TensorRT 10.3, Python 3.10).
# No torch: the chat runtime needs numpy, tokenizers, jinja2 and a backend — TensorRT from JetPack (seen
# through --system-site-packages) and cuda-python for device buffers; onnxruntime for the CPU fallback.
#   jetson/setup.sh [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: jetson/setup.sh [--dry-run]"; }
parse_common_args "$@"

ROOT=$(repo_root)
VENV="$ROOT/.venv-jetson"

if is_jetson; then
  printf 'JetPack: %s\n' "$(head -n 1 /etc/nv_tegra_release)"
elif [ "$DRY_RUN" -eq 0 ]; then
  die "this is not a Jetson (/etc/nv_tegra_release is missing); use --dry-run to see the steps"
fi

run sudo apt-get install -y python3-venv python3-pip python3-libnvinfer cmake build-essential
run python3 -m venv --system-site-packages "$VENV"   # keeps JetPack's tensorrt module visible
run "$VENV/bin/python" -m pip install --upgrade pip
run "$VENV/bin/python" -m pip install -e "${ROOT}[onnx]" "cuda-python>=12.6,<13"
run "$VENV/bin/python" -c "import tensorrt, belle_edge; print('tensorrt', tensorrt.__version__)"

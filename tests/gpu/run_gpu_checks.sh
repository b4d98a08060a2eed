#!/usr/bin/env bash
# The one prepared GPU check, for a machine with CUDA (run from the repository root). It uses the Python
# that holds CUDA torch there, imports belle_edge from the work tree, and writes its log to $OUT (or ./gpu-out).
# Later issues add the kernel build, the kernel-vs-reference checks and the GPU benchmark here.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '|', torch.cuda.get_device_name())"
  python3 -m pytest -q -rs -s -m gpu tests/gpu -p no:cacheprovider
} 2>&1 | tee "$out/gpu_checks.log"
exit "${PIPESTATUS[0]}"

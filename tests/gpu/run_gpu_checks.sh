#!/usr/bin/env bash
# The one prepared GPU check, for a machine with CUDA (run from the repository root):
#   1. builds kernels/ with nvcc for this GPU and prints ptxas' registers/spills of the hot kernels;
#   2. pytest -m gpu: attention kernels vs the reference over random shapes/layouts/dtypes, the weight-only
#      GEMM and the fused add+RMSNorm vs their references, the torch backend with the kernels, fused
#      projections, weight-only linears and CUDA graphs vs the CPU reference, TensorRT device code;
#   3. compute-sanitizer memcheck on small attention and weight-only GEMM cases;
#   4. the GPU benchmark (benchmarks/attention_gpu.py: attention vs SDPA+mask / FlexAttention / causal SDPA,
#      weight-only GEMV vs cuBLAS fp16, 3B decode at fp16/INT8/INT4, batch 4 vs 1, Orin projection).
#
#   tests/gpu/run_gpu_checks.sh [checks|bench|all]     (default all)
#
# `checks` is steps 1-3 (about 5 minutes), `bench` steps 1 and 4 (the build is cached); on a machine lent for
# one 10-minute call, run `checks` and `bench` as two calls. The benchmark saves its results after each part,
# so a run stopped by its time limit keeps what it finished.
# It uses the Python that holds CUDA torch there, imports belle_edge from the work tree, and writes its log and
# results to $OUT (or ./gpu-out). Each step has its own time limit; the exit status is the first failure's.
set -uo pipefail
phase=${1:-all}
case "$phase" in checks|bench|all) ;; *) echo "usage: $0 [checks|bench|all]" >&2; exit 2 ;; esac
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export BELLE_EDGE_CACHE=${BELLE_EDGE_CACHE:-/tmp/belle_edge_cache}
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name =="
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s =="
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvcc --version | tail -1
  python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '|', torch.cuda.get_device_name())"
  step "kernel build" 180 python3 -c "
import torch
from belle_edge.ops.build import build_library, parse_ptxas, HOT_KERNELS
import os
major, minor = torch.cuda.get_device_capability()
lib = build_library((major * 10 + minor,))
rows = parse_ptxas(open(os.path.join(os.path.dirname(lib), 'build.log')).read())
for r in rows:
    if any(h in r['name'] for h in HOT_KERNELS):
        print(f\"sm_{r['arch']} regs={r['registers']:3d} spill={r['spill_bytes']} stack={r['stack_bytes']} {r['name'][-60:]}\")
print('built', lib)"
  if [ "$phase" != bench ]; then
    step "pytest -m gpu" 240 python3 -m pytest -q -rs -s -m gpu tests/gpu tests/test_trt_backend.py -p no:cacheprovider
    step "compute-sanitizer" 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/gpu/sanitize_case.py
  fi
  if [ "$phase" != checks ]; then
    step "benchmark" 480 python3 benchmarks/attention_gpu.py --out "$out/results"
  fi
  exit "$status"
} 2>&1 | tee "$out/gpu_checks_$phase.log"
exit "${PIPESTATUS[0]}"

// belle_weight_only: Y = X @ W (+ bias) with W stored as 4- or 8-bit codes and fp16/bf16 scales, the
// weight-only quantization contract of belle_edge/compile/weight_only.py (activations stay fp16/bf16,
// accumulation is fp32).
//
// The weights are laid out exactly as the artifact's ONNX graph stores them (DequantizeLinear -> MatMul,
// export_onnx.py), so the TensorRT plugin (belle::WeightOnlyGemm) reads the engine's constants as they are
// and the torch backend packs its weights the same way — one layout, no second copy:
//
//     codes  [K, N]  signed two's complement, row-major; INT4 packs two per byte along N, the even column
//                    in the low nibble (ONNX's INT4 storage)
//     scales INT4: [K / group, N] (one per `group` consecutive inputs of a column, ONNX block_size on axis 0)
//            INT8: [N] (one per column, ONNX axis 1)
//     W[k, n] = scale * code, rounded to the activation dtype (what DequantizeLinear yields)
//
// One entry point, two kernels behind it (both tensor cores, mma.sync m16n8k16, with W as the A operand so
// a handful of rows wastes nothing):
//   * M <= 8 (decode, a few sequences): 8 rows per block; the K dimension is split over several blocks
//     when the output alone would not fill the GPU, and the last block of each output tile sums the
//     splits (no extra launch, no memset: the tile counters are left at zero);
//   * M > 8 (prefill): 64 rows per block.
// Codes are dequantized on the way into shared memory (two values per instruction, by the fp16/bf16
// "magic number" trick), so W is read from memory once per 8 or 64 rows, at 4 or 8 bits.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "belle_attention.h"  // BelleDType

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  BelleDType dtype;        // of x, scales, bias and y
  int bits;                // 4 or 8
  int m, n, k;             // X [m, k], W [k, n], Y [m, n]; n a multiple of 32 (INT4) or 16 (INT8), k of 8
  int group;               // INT4: inputs per scale, a multiple of 64 dividing k (128 in the contract); INT8: ignored

  const void* x;           // [m, k], 16-byte aligned
  int64_t x_stride;        // elements between rows of x, a multiple of 8
  const void* codes;       // see above, 16-byte aligned
  const void* scales;      // see above, 16-byte aligned
  const void* bias;        // [n] or NULL
  void* y;                 // [m, n]
  int64_t y_stride;        // elements between rows of y

  // Split-K for m <= 8 (optional: with either NULL every block covers all of K).
  void* workspace;         // belle_weight_only_workspace_size bytes: the splits' fp32 partial sums
  int32_t* tile_counters;  // belle_weight_only_counters_size bytes, zero before the first call; left zero
} BelleWeightOnlyParams;

size_t belle_weight_only_workspace_size(const BelleWeightOnlyParams* p);
size_t belle_weight_only_counters_size(const BelleWeightOnlyParams* p);

// Enqueue Y = X @ W (+ bias) on `stream`. Returns 0, a CUDA error code, or a negative parameter error
// (belle_weight_only_error_string).
int belle_weight_only_gemm(const BelleWeightOnlyParams* p, void* stream);

// W [k, n] in p->dtype, dequantized (x, y, bias, workspace unused): for tests, and for callers that
// prefer a dense GEMM library over long prompts.
int belle_weight_only_dequantize(const BelleWeightOnlyParams* p, void* w, void* stream);

const char* belle_weight_only_error_string(int code);

#ifdef __cplusplus
}
#endif

// belle_norm: the residual add and RMSNorm of a decoder layer boundary in one pass.
//
//     x_out = x + delta                       (rounded to the dtype, as the unfused model's add)
//     y     = x_out * rsqrt(mean(x_out^2) + eps) * weight   (fp32 inside, rounded once)
//
// In a decode step each layer has two such boundaries (before attention, before the MLP): unfused they are
// an add plus the four or five elementwise/reduction kernels of a norm; here one kernel reads x and delta
// once and writes x_out and y. LLaMA/Qwen2 (RMSNorm) only; BLOOM's LayerNorm keeps torch's kernels.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "belle_attention.h"  // BelleDType

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  BelleDType dtype;
  int rows, width;        // width a multiple of 8, at most 16384
  float eps;
  const void* x;          // [rows, width], contiguous, 16-byte aligned
  const void* delta;      // [rows, width] or NULL (then x_out = x)
  const void* weight;     // [width]
  void* x_out;            // [rows, width] (may be x itself)
  void* y;                // [rows, width]
} BelleRmsNormParams;

// 0, a CUDA error code, or a negative parameter error (belle_weight_only_error_string's numbering is not
// shared: see belle_rms_norm_error_string).
int belle_add_rms_norm(const BelleRmsNormParams* p, void* stream);
const char* belle_rms_norm_error_string(int code);

#ifdef __cplusplus
}
#endif

// belle_attention: fused dynamic-mask (turn-window) attention for prefill and decode.
//
// One C entry point serves every caller: the TensorRT plugin (kernels/plugin), the torch custom op
// (belle_edge/ops, through ctypes) and any C++ app. The mask is the one definition of belle_edge/mask.py,
// evaluated per (query, key) from per-token position/turn tables, never from a materialised [Q, K] mask:
//
//     key visible to query  iff  p_k <= p_q  and  (t_k == 0  or  p_k < sinks  or  0 <= t_q - t_k <= window)
//
// window = 2^62 means "off" (plain causal attention), as WINDOW_OFF in mask.py.
//
// One call (belle_attention_forward):
//   1. writes the T new keys/values into the cache in place, at slots [start, start + T) of every
//      (batch, kv head), rotating the keys with RoPE first when rope_inv_freq is given;
//   2. attends the T queries (rotated on load with RoPE when rope_inv_freq is given) over slots
//      [0, start + T): a flash-attention style prefill kernel (online softmax, tensor cores, whole KV tiles
//      outside every query's window skipped) when T > 1, a split-KV decode kernel (flash-decoding, one
//      block per kv head and KV chunk, query heads of a GQA group sharing the loaded keys) when T == 1;
//   3. writes the output as [B, T, H * D] in the input dtype.
// Scores are scale * q.k (+ alibi_slope[h] * (p_k - p_q)), accumulated in fp32.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { BELLE_FP16 = 0, BELLE_BF16 = 1 } BelleDType;

typedef struct {
  BelleDType dtype;
  int batch, num_heads, num_kv_heads, head_dim;  // head_dim 64 or 128; num_heads % num_kv_heads == 0
  int new_tokens;                                 // T >= 1
  int cache_capacity;                             // slots per (batch, kv head) in k_cache / v_cache
  int start;                                      // slots already filled (the new tokens go after them)...
  const int32_t* start_device;                    // ...or, when not NULL, read from device memory (CUDA graphs)
  int max_keys;                                   // upper bound on start + T (sizes the decode grid)

  // Tensors: element strides; the last (head_dim) dimension is contiguous.
  const void* q;  // [B, H, T, D]
  int64_t q_stride_b, q_stride_h, q_stride_t;
  const void* k_new;  // [B, Hkv, T, D]
  const void* v_new;
  int64_t kv_new_stride_b, kv_new_stride_h, kv_new_stride_t;
  void* k_cache;  // [B, Hkv, cache_capacity, D], contiguous
  void* v_cache;

  const int64_t* q_pos;   // [B, T] position of each new token (row stride = q_table_stride)
  const int64_t* q_turn;  // [B, T] turn of each new token
  int64_t q_table_stride;
  const int64_t* k_pos;   // [B, >= start + T] position of each cache slot (row stride = k_table_stride)
  const int64_t* k_turn;  // [B, >= start + T] turn of each cache slot
  int64_t k_table_stride;
  const int64_t* window;  // device scalar: W (2^62 = off)
  const int64_t* sinks;   // device scalar: S

  const void* alibi_slopes;     // [H] in dtype, or NULL (no ALiBi)
  const float* rope_inv_freq;   // [D / 2] fp32, or NULL (no RoPE: q and k_new already rotated)
  float scale;                  // usually 1 / sqrt(D)

  void* out;                    // [B, T, H * D], contiguous
  void* workspace;              // decode partial results; belle_attention_workspace_size bytes
} BelleAttentionParams;

// Bytes of workspace a call with these params needs (0 for prefill): batch * num_heads *
// ceil(max_keys / 128) * (head_dim + 2) * 4, whatever the GPU, so an engine built without one sizes it right.
size_t belle_attention_workspace_size(const BelleAttentionParams* p);

// Enqueue the work on `stream` (a cudaStream_t). Returns 0 (cudaSuccess) or a CUDA error code; a
// negative value is a parameter error (see belle_attention_error_string).
int belle_attention_forward(const BelleAttentionParams* p, void* stream);

// A message for a return code of belle_attention_forward.
const char* belle_attention_error_string(int code);

#ifdef __cplusplus
}
#endif

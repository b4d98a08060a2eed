// Shared device helpers of the attention kernels: dtype traits, the turn-window rule, tensor-core MMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "belle_attention.h"

namespace belle {

constexpr float kLog2e = 1.4426950408889634f;
#define kNegInf (-__int_as_float(0x7f800000))  // -inf; constexpr cannot call the intrinsic

// The turn-window rule of belle_edge/mask.py (`visible`), the single definition of the project, restated
// here only because device code cannot call Python; tests/gpu/test_kernels_cuda.py checks these kernels against
// the reference attention that calls mask.visible, over random turn layouts and window/sink settings.
__device__ __forceinline__ bool visible(int64_t q_pos, int64_t q_turn, int64_t k_pos, int64_t k_turn,
                                        int64_t window, int64_t sinks) {
  return k_pos <= q_pos && (k_turn == 0 || k_pos < sinks || (k_turn <= q_turn && q_turn - k_turn <= window));
}

template <typename T> struct Dtype;

template <> struct Dtype<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float bits_to_float(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // D (16x8 f32) += A (16x16, row) * B (16x8, col), fp16 inputs.
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Dtype<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ float bits_to_float(unsigned short b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Four 8x8 b16 matrices from shared memory, one row address per lane (lanes 8m..8m+7: matrix m). With
// .trans each lane receives a column pair instead of a row pair (the B-operand layout from a row-major
// [k][n] tile, or W^T's A-operand layout from a [k][n] weight tile).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Eight 16-bit values packed in 16 bytes -> floats, by bit operations (taking the address of a register
// array would put it in local memory).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 raw, float out[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = Dtype<T>::bits_to_float(static_cast<unsigned short>(w[i] & 0xffffu));
    out[2 * i + 1] = Dtype<T>::bits_to_float(static_cast<unsigned short>(w[i] >> 16));
  }
}

// The start slot: a host value, or read from device memory (so a captured CUDA graph replays any length).
__device__ __forceinline__ int load_start(const BelleAttentionParams& p) {
  return p.start_device ? *p.start_device : p.start;
}

// LLaMA's half-split RoPE angle for dimension pair i (of head_dim / 2) at position pos, in fp32 as the
// reference (models/decoder.py rope_tables) computes it. Accurate sincosf keeps a 32-byte local array for
// its slow range reduction (|angle| > 105615, never reached by real positions): the "32 bytes stack frame"
// ptxas reports for kernels with RoPE; it is not a spill.
__device__ __forceinline__ void rope_cos_sin(const float* inv_freq, int i, int64_t pos, float& c, float& s) {
  sincosf(static_cast<float>(pos) * inv_freq[i], &s, &c);
}

}  // namespace belle

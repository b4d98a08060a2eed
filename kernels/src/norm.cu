// Residual add + RMSNorm in one kernel (include/belle_norm.h): one block per row, 16-byte loads, the row
// held in registers between the sum of squares and the scaling (width <= 16384: 8 values x 256 threads x 8).
#include "belle_norm.h"
#include "common.cuh"

namespace belle {
namespace {

constexpr int THREADS = 256;
constexpr int kMaxChunks = 8;  // 16-byte chunks per thread: width <= 8 * 8 * 256

template <typename T>
__global__ void __launch_bounds__(THREADS) add_rms_norm_kernel(BelleRmsNormParams p) {
  using DT = Dtype<T>;
  __shared__ float warp_sums[THREADS / 32];
  const int row = blockIdx.x, tid = threadIdx.x, chunks = p.width / 8;
  const int64_t base = static_cast<int64_t>(row) * p.width;
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + base);
  const uint4* d = p.delta ? reinterpret_cast<const uint4*>(static_cast<const T*>(p.delta) + base) : nullptr;
  uint4* xo = reinterpret_cast<uint4*>(static_cast<T*>(p.x_out) + base);

  float v[kMaxChunks][8];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = tid + i * THREADS;
    if (c >= chunks) break;
    unpack8<T>(x[c], v[i]);
    if (d) {
      float dv[8];
      unpack8<T>(d[c], dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i][e] = DT::to_float(DT::from_float(v[i][e] + dv[e]));  // the model's rounded add
      xo[c] = make_uint4(DT::pack(v[i][0], v[i][1]), DT::pack(v[i][2], v[i][3]), DT::pack(v[i][4], v[i][5]),
                         DT::pack(v[i][6], v[i][7]));
    } else if (p.x_out != p.x) {
      xo[c] = x[c];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sum = fmaf(v[i][e], v[i][e], sum);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (tid % 32 == 0) warp_sums[tid / 32] = sum;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  const float rstd = rsqrtf(total / static_cast<float>(p.width) + p.eps);

  const uint4* w = reinterpret_cast<const uint4*>(p.weight);
  uint4* y = reinterpret_cast<uint4*>(static_cast<T*>(p.y) + base);
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = tid + i * THREADS;
    if (c >= chunks) break;
    float wv[8];
    unpack8<T>(w[c], wv);
    y[c] = make_uint4(DT::pack(v[i][0] * rstd * wv[0], v[i][1] * rstd * wv[1]),
                      DT::pack(v[i][2] * rstd * wv[2], v[i][3] * rstd * wv[3]),
                      DT::pack(v[i][4] * rstd * wv[4], v[i][5] * rstd * wv[5]),
                      DT::pack(v[i][6] * rstd * wv[6], v[i][7] * rstd * wv[7]));
  }
}

enum : int { kNullPointer = -1, kBadShape = -2, kMisaligned = -3, kBadDtype = -4 };

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace
}  // namespace belle

extern "C" int belle_add_rms_norm(const BelleRmsNormParams* p, void* stream) {
  using namespace belle;
  if (!p || !p->x || !p->weight || !p->x_out || !p->y) return kNullPointer;
  if (p->dtype != BELLE_FP16 && p->dtype != BELLE_BF16) return kBadDtype;
  if (p->rows < 0 || p->width <= 0 || p->width % 8 || p->width > 8 * kMaxChunks * THREADS) return kBadShape;
  if (!aligned16(p->x) || !aligned16(p->weight) || !aligned16(p->x_out) || !aligned16(p->y) ||
      (p->delta && !aligned16(p->delta)))
    return kMisaligned;
  if (p->rows == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == BELLE_FP16)
    add_rms_norm_kernel<__half><<<p->rows, THREADS, 0, s>>>(*p);
  else
    add_rms_norm_kernel<__nv_bfloat16><<<p->rows, THREADS, 0, s>>>(*p);
  return cudaGetLastError();
}

extern "C" const char* belle_rms_norm_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case belle::kNullPointer: return "a required pointer is NULL";
    case belle::kBadShape: return "width must be a positive multiple of 8, at most 16384; rows >= 0";
    case belle::kMisaligned: return "x, delta, weight, x_out and y must be 16-byte aligned";
    case belle::kBadDtype: return "dtype must be BELLE_FP16 or BELLE_BF16";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

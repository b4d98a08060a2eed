// Weight-only GEMM / GEMV: Y[m, n] = X[m, k] @ (scale * code)[k, n] (+ bias), fp32 accumulation.
// The contract (layout, types) is include/belle_weight_only.h.
//
// Tensor cores with the roles swapped: W^T is the A operand (16 output columns per MMA row block) and X^T
// the B operand (8 rows of X per MMA), so a decode step of 1-8 rows wastes no MMA work on padding.
//
// One block = 4 warps = 128 output columns (32 per warp) x MT rows of X (8 for decode, 64 for prefill).
// Per stage of 64 inputs: the block loads 64 x 128 codes (4 KB at INT4), dequantizes them in registers
// (two values per instruction) and stores them as fp16/bf16 into shared memory [k][n]; ldmatrix.trans
// turns that into A fragments. The next stage's codes are loaded into registers while this stage's MMAs
// run. With MT = 8 the k dimension is split over several blocks when the output tiles alone would not
// fill the GPU; each block then writes fp32 partials and the last one to finish a tile (a counter per
// tile) adds them up, adds the bias and writes Y — one launch, and the counter is reset for the next call.
#include "belle_weight_only.h"
#include "common.cuh"

namespace belle {
namespace {

constexpr int TN = 128;           // output columns per block
constexpr int BK = 64;            // inputs per stage
constexpr int THREADS = 128;      // 4 warps x 32 columns
constexpr int WROW = TN + 8;      // shared row of the dequantized tile (halves): ldmatrix rows on distinct banks
constexpr int XROW = BK + 8;
constexpr int kMaxSplits = 16;
constexpr int kGemvRows = 8;      // m <= 8: the decode kernel
constexpr int kGemmRows = 64;

// ------------------------------------------------------------------------------------------ dequantize
// A code becomes an exact small integer in the activation type by the "magic number" trick: OR its
// unsigned form u = code + 2^(bits-1) into the mantissa of a float whose exponent makes the unit step 1
// (fp16 1024: 0x6400; bf16 128: 0x4300), then subtract (magic + 2^(bits-1)). Multiplying by the scale
// rounds once, as DequantizeLinear does in that type.
template <typename T> struct Magic;
template <> struct Magic<__half> {
  static constexpr uint32_t kBits = 0x64006400u;  // 1024 in both halves
  static constexpr float kInt4 = 1032.f;           // 1024 + 8: (magic | code + 8) - this = code
  static __device__ __forceinline__ uint32_t sub_mul(uint32_t v, float bias, uint32_t scale) {
    __half2 h = __hsub2(*reinterpret_cast<__half2*>(&v), __float2half2_rn(bias));
    h = __hmul2(h, *reinterpret_cast<__half2*>(&scale));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kBits = 0x43004300u;  // 128 in both halves
  static constexpr float kInt4 = 136.f;            // 128 + 8
  static __device__ __forceinline__ uint32_t sub_mul(uint32_t v, float bias, uint32_t scale) {
    __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), __float2bfloat162_rn(bias));
    h = __hmul2(h, *reinterpret_cast<__nv_bfloat162*>(&scale));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// 32 INT4 codes (16 bytes, columns c..c+31) -> 32 values (4 x 16 bytes, in column order). `sp` holds the
// scales pre-paired as the trick produces values: sp[4q + i] = (scale of column 8q+i, of column 8q+i+4).
template <typename T>
__device__ __forceinline__ void dequant_int4(const uint4 raw, const uint32_t sp[16], uint4 out[4]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t o[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t t = w[q] ^ 0x88888888u;  // signed nibble -> code + 8
    uint32_t h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)  // h[i] = (column i, column i + 4) of this word
      h[i] = Magic<T>::sub_mul(((t >> (4 * i)) & 0x000f000fu) | Magic<T>::kBits, Magic<T>::kInt4, sp[4 * q + i]);
    o[4 * q + 0] = __byte_perm(h[0], h[1], 0x5410);  // columns 0, 1
    o[4 * q + 1] = __byte_perm(h[2], h[3], 0x5410);  // 2, 3
    o[4 * q + 2] = __byte_perm(h[0], h[1], 0x7632);  // 4, 5
    o[4 * q + 3] = __byte_perm(h[2], h[3], 0x7632);  // 6, 7
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = make_uint4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);
}

// 16 INT8 codes (16 bytes, columns c..c+15) -> 16 values (2 x 16 bytes). s[j] = scales of columns 2j, 2j+1.
template <typename T>
__device__ __forceinline__ void dequant_int8(const uint4 raw, const uint32_t s[8], uint4 out[2]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t o[8];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t t = w[q] ^ 0x80808080u;  // signed byte -> code + 128
    if constexpr (Magic<T>::kBits == 0x64006400u) {  // fp16: 1024 + u is exact for u < 1024
      o[2 * q] = Magic<T>::sub_mul(__byte_perm(t, 0x64646464u, 0x4140), 1152.f, s[2 * q]);
      o[2 * q + 1] = Magic<T>::sub_mul(__byte_perm(t, 0x64646464u, 0x4342), 1152.f, s[2 * q + 1]);
    } else {  // bf16 has 8 significant bits: 128 + u is not exact past 255, go through fp32
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t sj = s[2 * q + j];
        const float lo = __int_as_float(0x4b000000 | ((t >> (16 * j)) & 0xff)) - 8388736.f;  // 2^23 + 128
        const float hi = __int_as_float(0x4b000000 | ((t >> (16 * j + 8)) & 0xff)) - 8388736.f;
        const float s_lo = Dtype<T>::bits_to_float(static_cast<unsigned short>(sj & 0xffffu));
        const float s_hi = Dtype<T>::bits_to_float(static_cast<unsigned short>(sj >> 16));
        // code * scale rounded once, as in fp16's path (the product of an 8-bit integer and a bf16 scale
        // is exact in fp32)
        o[2 * q + j] = Dtype<T>::pack(lo * s_lo, hi * s_hi);
      }
    }
  }
  out[0] = make_uint4(o[0], o[1], o[2], o[3]);
  out[1] = make_uint4(o[4], o[5], o[6], o[7]);
}

// INT4: the scales of 32 columns (4 x 16 bytes at sg) paired as dequant_int4 wants them.
template <typename T>
__device__ __forceinline__ void load_int4_scales(const T* sg, bool ok, uint32_t sp[16]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {  // scales of columns 8q .. 8q+7, paired (i, i + 4)
    const uint4 s = ok ? *reinterpret_cast<const uint4*>(sg + 8 * q) : make_uint4(0, 0, 0, 0);
    sp[4 * q + 0] = __byte_perm(s.x, s.z, 0x5410);
    sp[4 * q + 1] = __byte_perm(s.x, s.z, 0x7632);
    sp[4 * q + 2] = __byte_perm(s.y, s.w, 0x5410);
    sp[4 * q + 3] = __byte_perm(s.y, s.w, 0x7632);
  }
}

// INT8: the scales of 16 columns (2 x 16 bytes at sg), in column order.
template <typename T>
__device__ __forceinline__ void load_int8_scales(const T* sg, bool ok, uint32_t sp[16]) {
  const uint4 a = ok ? *reinterpret_cast<const uint4*>(sg) : make_uint4(0, 0, 0, 0);
  const uint4 b = ok ? *reinterpret_cast<const uint4*>(sg + 8) : make_uint4(0, 0, 0, 0);
  sp[0] = a.x; sp[1] = a.y; sp[2] = a.z; sp[3] = a.w;
  sp[4] = b.x; sp[5] = b.y; sp[6] = b.z; sp[7] = b.w;
}

// --------------------------------------------------------------------------------------------- kernel
template <int BITS> struct Tile {
  static constexpr int kChunkCols = BITS == 4 ? 32 : 16;         // columns per 16-byte load
  static constexpr int kChunksPerRow = TN / kChunkCols;          // 4 | 8
  static constexpr int kLoads = BK * kChunksPerRow / THREADS;    // 16-byte loads per thread per stage: 2 | 4
  static constexpr int kRowStep = THREADS / kChunksPerRow;       // rows between a thread's loads: 32 | 16
};

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(THREADS) weight_only_kernel(BelleWeightOnlyParams p, int k_chunk, int splits) {
  using DT = Dtype<T>;
  using TL = Tile<BITS>;
  __shared__ __align__(16) T sW[BK * WROW];
  __shared__ __align__(16) T sX[MT * XROW];
  __shared__ bool s_last;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n0 = blockIdx.x * TN, m0 = blockIdx.y * MT, split = blockIdx.z;
  const int k_begin = split * k_chunk, k_end = min(p.k, k_begin + k_chunk);
  const int N = p.n;

  // This thread's share of a stage: rows r0 + i * kRowStep, the 16-byte chunk `ch` of each row.
  const int ch = tid % TL::kChunksPerRow, r0 = tid / TL::kChunksPerRow;
  const int col = n0 + ch * TL::kChunkCols;  // first global column of the chunk
  const bool col_ok = col < N;
  const unsigned char* codes = static_cast<const unsigned char*>(p.codes);
  const int64_t row_bytes = BITS == 4 ? N / 2 : N;
  const T* scales = static_cast<const T*>(p.scales);

  // INT8: the chunk's 16 column scales, fixed for the whole kernel.
  uint32_t sp[16];
  if constexpr (BITS == 8) load_int8_scales(scales + col, col_ok, sp);
  int group_now = -1;

  uint4 creg[TL::kLoads];
  uint4 xreg = make_uint4(0, 0, 0, 0);  // the X tile: MT rows x 64 inputs = MT * 8 chunks of 16 bytes
  uint4 xreg2[MT * 8 / THREADS > 1 ? MT * 8 / THREADS : 1];
  const T* xg = static_cast<const T*>(p.x);

  auto load_stage = [&](int k0) {
#pragma unroll
    for (int i = 0; i < TL::kLoads; ++i) {
      const int k = k0 + r0 + i * TL::kRowStep;
      creg[i] = (col_ok && k < k_end)
          ? *reinterpret_cast<const uint4*>(codes + k * row_bytes + (BITS == 4 ? col / 2 : col))
          : make_uint4(0, 0, 0, 0);  // a zero code dequantizes to 0
    }
    if constexpr (MT * 8 <= THREADS) {
      if (tid < MT * 8) {
        const int r = tid / 8, c8 = (tid % 8) * 8, m = m0 + r, k = k0 + c8;
        xreg = (m < p.m && k < k_end) ? *reinterpret_cast<const uint4*>(xg + m * p.x_stride + k)
                                      : make_uint4(0, 0, 0, 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < MT * 8 / THREADS; ++i) {
        const int e = tid + i * THREADS, r = e / 8, c8 = (e % 8) * 8, m = m0 + r, k = k0 + c8;
        xreg2[i] = (m < p.m && k < k_end) ? *reinterpret_cast<const uint4*>(xg + m * p.x_stride + k)
                                          : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto store_stage = [&](int k0) {
    if constexpr (BITS == 4) {
      const int group = k0 / p.group;  // a stage lies in one group: group % 64 == 0, k0 % 64 == 0
      if (group != group_now) {
        group_now = group;
        load_int4_scales(scales + static_cast<int64_t>(group) * N + col, col_ok, sp);
      }
    }
#pragma unroll
    for (int i = 0; i < TL::kLoads; ++i) {
      T* dst = sW + (r0 + i * TL::kRowStep) * WROW + ch * TL::kChunkCols;
      if constexpr (BITS == 4) {
        uint4 v[4];
        dequant_int4<T>(creg[i], sp, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) reinterpret_cast<uint4*>(dst)[q] = v[q];
      } else {
        uint4 v[2];
        dequant_int8<T>(creg[i], sp, v);
        reinterpret_cast<uint4*>(dst)[0] = v[0];
        reinterpret_cast<uint4*>(dst)[1] = v[1];
      }
    }
    if constexpr (MT * 8 <= THREADS) {
      if (tid < MT * 8) *reinterpret_cast<uint4*>(sX + (tid / 8) * XROW + (tid % 8) * 8) = xreg;
    } else {
#pragma unroll
      for (int i = 0; i < MT * 8 / THREADS; ++i) {
        const int e = tid + i * THREADS;
        *reinterpret_cast<uint4*>(sX + (e / 8) * XROW + (e % 8) * 8) = xreg2[i];
      }
    }
  };

  float acc[2][MT / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < MT / 8; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  // A fragments: lanes 0-7 address inputs k..k+7 at columns c..c+7 (matrix a0), 8-15 columns c+8.. (a1),
  // 16-23 inputs k+8.. (a2), 24-31 both (a3); .trans hands each lane the (column, input pair) layout.
  const int a_row = (lane & 7) + ((lane >> 4) << 3), a_col = warp * 32 + ((lane >> 3) & 1) * 8;
  // B fragments: lane l addresses row l % 8 of X at inputs (l / 8) * 8: two k16 steps per ldmatrix.
  const int b_row = lane & 7, b_col = (lane >> 3) * 8;

  if (k_begin < k_end) load_stage(k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    __syncthreads();  // the previous stage's MMAs are done with sW / sX
    store_stage(k0);
    __syncthreads();
    if (k0 + BK < k_end) load_stage(k0 + BK);  // in flight while the MMAs below run
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      uint32_t bx[MT / 8][4];
#pragma unroll
      for (int j = 0; j < MT / 8; ++j) ldmatrix_x4(bx[j], sX + (j * 8 + b_row) * XROW + kk + b_col);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, sW + (kk + 16 * s + a_row) * WROW + a_col + 16 * i);
#pragma unroll
          for (int j = 0; j < MT / 8; ++j) DT::mma(acc[i][j], a, bx[j][2 * s], bx[j][2 * s + 1]);
        }
      }
    }
  }

  // Accumulator (i, j): rows n = warp*32 + 16i + g (+8 for elements 2, 3), columns m = 8j + 2c (+1).
  const int g = lane / 4, c = lane % 4;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < MT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = n0 + warp * 32 + 16 * i + g + (e >= 2 ? 8 : 0), m = m0 + 8 * j + 2 * c + (e & 1);
          if (n < N && m < p.m) {
            const float b = bias ? DT::to_float(bias[n]) : 0.f;
            y[m * p.y_stride + n] = DT::from_float(acc[i][j][e] + b);
          }
        }
    return;
  }
  // Split-K (MT == 8, one row block): partials, then the last block of this column tile sums them.
  float* partial = static_cast<float*>(p.workspace);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = n0 + warp * 32 + 16 * i + g + (e >= 2 ? 8 : 0), m = 2 * c + (e & 1);
      if (n < N && m < p.m) partial[(static_cast<int64_t>(split) * p.m + m) * N + n] = acc[i][0][e];
    }
  __threadfence();  // the partials are visible device-wide before the counter says so
  __syncthreads();
  if (tid == 0) {
    const int done = atomicAdd(p.tile_counters + blockIdx.x, 1);
    s_last = done == splits - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int e = tid; e < p.m * TN; e += THREADS) {
    const int m = e / TN, n = n0 + e % TN;
    if (n >= N) continue;
    float sum = bias ? DT::to_float(bias[n]) : 0.f;
    for (int s = 0; s < splits; ++s) sum += __ldcg(partial + (static_cast<int64_t>(s) * p.m + m) * N + n);
    y[m * p.y_stride + n] = DT::from_float(sum);
  }
  if (tid == 0) p.tile_counters[blockIdx.x] = 0;  // ready for the next call
}

// W [k, n] dequantized, one thread per 16-byte chunk of codes.
template <typename T, int BITS>
__global__ void dequantize_kernel(BelleWeightOnlyParams p, T* w) {
  using TL = Tile<BITS>;
  const int chunks = p.n / TL::kChunkCols;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(chunks) * p.k) return;
  const int k = static_cast<int>(e / chunks), col = static_cast<int>(e % chunks) * TL::kChunkCols;
  const unsigned char* codes = static_cast<const unsigned char*>(p.codes);
  const T* scales = static_cast<const T*>(p.scales);
  const uint4 raw = *reinterpret_cast<const uint4*>(codes + static_cast<int64_t>(k) * (BITS == 4 ? p.n / 2 : p.n) +
                                                    (BITS == 4 ? col / 2 : col));
  uint32_t sp[16];
  T* dst = w + static_cast<int64_t>(k) * p.n + col;
  if constexpr (BITS == 4) {
    load_int4_scales(scales + static_cast<int64_t>(k / p.group) * p.n + col, true, sp);
    uint4 v[4];
    dequant_int4<T>(raw, sp, v);
#pragma unroll
    for (int q = 0; q < 4; ++q) reinterpret_cast<uint4*>(dst)[q] = v[q];
  } else {
    load_int8_scales(scales + col, true, sp);
    uint4 v[2];
    dequant_int8<T>(raw, sp, v);
    reinterpret_cast<uint4*>(dst)[0] = v[0];
    reinterpret_cast<uint4*>(dst)[1] = v[1];
  }
}

// ------------------------------------------------------------------------------------------------ host
enum : int {
  kNullPointer = -1,
  kBadBits = -2,
  kBadShape = -3,
  kBadGroup = -4,
  kMisaligned = -5,
  kBadDtype = -6,
};

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int check(const BelleWeightOnlyParams* p, bool needs_xy) {
  if (!p || !p->codes || !p->scales || (needs_xy && (!p->x || !p->y))) return kNullPointer;
  if (p->dtype != BELLE_FP16 && p->dtype != BELLE_BF16) return kBadDtype;
  if (p->bits != 4 && p->bits != 8) return kBadBits;
  if (p->n <= 0 || p->k <= 0 || p->k % 8 || p->m < 0 || p->n % (p->bits == 4 ? 32 : 16)) return kBadShape;
  if (p->bits == 4 && (p->group <= 0 || p->group % BK || p->k % p->group)) return kBadGroup;
  if (!aligned16(p->codes) || !aligned16(p->scales)) return kMisaligned;
  if (needs_xy && (!aligned16(p->x) || p->x_stride % 8 || p->x_stride < p->k || p->y_stride < p->n))
    return kMisaligned;
  return 0;
}

int sm_count() {
  // Read per call (cheap, and allowed during graph capture): a cached value would be wrong on another GPU
  // of the same process.
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 108;
  return count;
}

int column_tiles(const BelleWeightOnlyParams& p) { return (p.n + TN - 1) / TN; }

// Split-K for the decode kernel: enough blocks for about two per SM, each split a whole number of stages.
void plan_splits(const BelleWeightOnlyParams& p, int& splits, int& k_chunk) {
  splits = 1;
  if (p.m <= kGemvRows && p.workspace && p.tile_counters) {
    const int stages = (p.k + BK - 1) / BK;
    const int want = (2 * sm_count() + column_tiles(p) - 1) / column_tiles(p);
    splits = max(1, min(min(want, kMaxSplits), stages));
  }
  const int stages_per_split = ((p.k + BK - 1) / BK + splits - 1) / splits;
  k_chunk = stages_per_split * BK;
  splits = (p.k + k_chunk - 1) / k_chunk;
}

template <typename T, int BITS>
cudaError_t launch(const BelleWeightOnlyParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  int splits, k_chunk;
  plan_splits(p, splits, k_chunk);
  if (p.m <= kGemvRows) {
    weight_only_kernel<T, BITS, kGemvRows><<<dim3(column_tiles(p), 1, splits), THREADS, 0, stream>>>(p, k_chunk, splits);
  } else {
    const dim3 grid(column_tiles(p), (p.m + kGemmRows - 1) / kGemmRows, 1);
    weight_only_kernel<T, BITS, kGemmRows><<<grid, THREADS, 0, stream>>>(p, p.k, 1);
  }
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_dequantize(const BelleWeightOnlyParams& p, void* w, cudaStream_t stream) {
  const int64_t chunks = static_cast<int64_t>(p.n / Tile<BITS>::kChunkCols) * p.k;
  dequantize_kernel<T, BITS><<<static_cast<unsigned>((chunks + 255) / 256), 256, 0, stream>>>(p, static_cast<T*>(w));
  return cudaGetLastError();
}

}  // namespace
}  // namespace belle

extern "C" size_t belle_weight_only_workspace_size(const BelleWeightOnlyParams* p) {
  if (!p || p->m > belle::kGemvRows || p->m <= 0 || p->n <= 0) return 0;
  return static_cast<size_t>(belle::kMaxSplits) * p->m * p->n * sizeof(float);
}

extern "C" size_t belle_weight_only_counters_size(const BelleWeightOnlyParams* p) {
  if (!p || p->n <= 0) return 0;
  return static_cast<size_t>((p->n + belle::TN - 1) / belle::TN) * sizeof(int32_t);
}

extern "C" int belle_weight_only_gemm(const BelleWeightOnlyParams* p, void* stream) {
  const int bad = belle::check(p, true);
  if (bad) return bad;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == BELLE_FP16)
    return p->bits == 4 ? belle::launch<__half, 4>(*p, s) : belle::launch<__half, 8>(*p, s);
  return p->bits == 4 ? belle::launch<__nv_bfloat16, 4>(*p, s) : belle::launch<__nv_bfloat16, 8>(*p, s);
}

extern "C" int belle_weight_only_dequantize(const BelleWeightOnlyParams* p, void* w, void* stream) {
  const int bad = belle::check(p, false);
  if (bad) return bad;
  if (!w || !belle::aligned16(w)) return w ? belle::kMisaligned : belle::kNullPointer;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == BELLE_FP16)
    return p->bits == 4 ? belle::launch_dequantize<__half, 4>(*p, w, s) : belle::launch_dequantize<__half, 8>(*p, w, s);
  return p->bits == 4 ? belle::launch_dequantize<__nv_bfloat16, 4>(*p, w, s)
                      : belle::launch_dequantize<__nv_bfloat16, 8>(*p, w, s);
}

extern "C" const char* belle_weight_only_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case belle::kNullPointer: return "a required pointer is NULL";
    case belle::kBadBits: return "bits must be 4 or 8";
    case belle::kBadShape: return "n must be a positive multiple of 32 (INT4) or 16 (INT8), k a positive multiple of 8, m >= 0";
    case belle::kBadGroup: return "INT4 group must be a positive multiple of 64 that divides k";
    case belle::kMisaligned: return "x, codes, scales and w must be 16-byte aligned, x_stride a multiple of 8 and >= k, y_stride >= n";
    case belle::kBadDtype: return "dtype must be BELLE_FP16 or BELLE_BF16";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

// Decode: one new query per sequence over the turn-segmented cache, split over the KV length
// (flash-decoding), so a long cache spreads over the whole GPU instead of one block per head.
//
// Grid (splits, kv heads, batch); one block reads its chunk of keys once for all G query heads of its GQA
// group. A key takes D/8 lanes (16 bytes each); a warp step covers 32/(D/8) keys and is skipped whole when
// none of them is visible. Each block leaves an unnormalised partial (max, sum, acc[D]) per head in the
// workspace; a second small kernel merges the splits and writes the output in the model's dtype.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace belle {
namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int MIN_KEYS_PER_SPLIT = 128;

// Keys per split, from the length held now (read on the device, so a captured graph replays at any length):
// every split of the grid gets work from the first decode step on, instead of chunks sized for the
// capacity that leave most blocks idle while the cache is short. At least 16 keys (one block step).
__device__ __forceinline__ int split_chunk(int n_keys, int splits) {
  return max(16, (n_keys + splits - 1) / splits);
}

template <int N>
__device__ __forceinline__ void merge(float& m, float& l, float* acc, float m2, float l2, const float* acc2) {
  const float mx = fmaxf(m, m2);
  const float fa = m == kNegInf ? 0.f : exp2f(m - mx), fb = m2 == kNegInf ? 0.f : exp2f(m2 - mx);
  l = l * fa + l2 * fb;
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = acc[e] * fa + acc2[e] * fb;
  m = mx;
}

template <typename T>
__device__ __forceinline__ void load8(const T* src, float out[8]) {
  unpack8<T>(*reinterpret_cast<const uint4*>(src), out);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(THREADS) decode_kernel(BelleAttentionParams p) {
  using DT = Dtype<T>;
  constexpr int LANES = D / 8;        // lanes per key
  constexpr int KPW = 32 / LANES;     // keys per warp step
  __shared__ float sm_m[WARPS][G], sm_l[WARPS][G], sm_acc[WARPS][G][D];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, sub = lane / LANES, part = lane % LANES;
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
  const int n_keys = min(load_start(p) + 1, p.max_keys);
  const int chunk = split_chunk(n_keys, splits);
  const int begin = split * chunk, end = min(n_keys, begin + chunk);
  // Splits past the keys held now (short caches, where 16-key chunks run out first) leave at once; the
  // combine pass reads only the live ones.
  if (begin >= n_keys) return;
  const int64_t window = *p.window, sinks = *p.sinks;
  const int64_t qp = p.q_pos[b * p.q_table_stride], qt = p.q_turn[b * p.q_table_stride];

  // This lane's 8 dimensions of each query head, rotated (RoPE) and rounded to the dtype as the reference
  // does, then scaled into log2 units.
  float q[G][8], slope[G], m[G], l[G], acc[G][8];
  const int d0 = part * 8;
  float cs[8], sn[8];  // RoPE angles of this lane's dimensions: the same for every head of the group
  if (p.rope_inv_freq) {
#pragma unroll
    for (int e = 0; e < 8; ++e) rope_cos_sin(p.rope_inv_freq, (d0 + e) % (D / 2), qp, cs[e], sn[e]);
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int h = hk * G + g;
    const T* qh = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
    load8(qh + d0, q[g]);
    if (p.rope_inv_freq) {
      float partner[8];
      const bool low = d0 < D / 2;
      load8(qh + (low ? d0 + D / 2 : d0 - D / 2), partner);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float y = low ? q[g][e] * cs[e] - partner[e] * sn[e] : q[g][e] * cs[e] + partner[e] * sn[e];
        q[g][e] = DT::to_float(DT::from_float(y));
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) q[g][e] *= p.scale * kLog2e;
    slope[g] = p.alibi_slopes ? DT::to_float(static_cast<const T*>(p.alibi_slopes)[h]) * kLog2e : 0.f;
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  const int64_t kv_base = ((static_cast<int64_t>(b) * p.num_kv_heads + hk) * p.cache_capacity) * D;
  const T* kg = static_cast<const T*>(p.k_cache) + kv_base;
  const T* vg = static_cast<const T*>(p.v_cache) + kv_base;
  const int64_t* kpos = p.k_pos + b * p.k_table_stride;
  const int64_t* kturn = p.k_turn + b * p.k_table_stride;

  // U key steps per iteration: their K/V loads are all issued before any is used, so a warp keeps several
  // 16-byte loads in flight (decode is bound by memory latency as much as by bandwidth). Fewer for large G,
  // whose per-head state already fills the registers.
  constexpr int U = G <= 2 ? 4 : (G <= 4 ? 2 : 1);
  for (int base = begin + warp * KPW * U; base < end; base += WARPS * KPW * U) {  // warp-uniform bounds
    int64_t kp[U];
    bool vis[U];
    bool any = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * KPW + sub;
      const bool valid = j < end;
      kp[u] = valid ? kpos[j] : 0;
      vis[u] = valid && visible(qp, qt, kp[u], valid ? kturn[j] : 0, window, sinks);
      any |= vis[u];
    }
    if (!__any_sync(0xffffffffu, any)) continue;  // whole steps outside the window: no K/V read
    uint4 kraw[U], vraw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + u * KPW + sub;
      kraw[u] = vis[u] ? *reinterpret_cast<const uint4*>(kg + j * D + d0) : make_uint4(0, 0, 0, 0);
      vraw[u] = vis[u] ? *reinterpret_cast<const uint4*>(vg + j * D + d0) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float k[8], v[8];
      unpack8<T>(kraw[u], k);
      unpack8<T>(vraw[u], v);
      float dot[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) sum = fmaf(q[g][e], k[e], sum);
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        dot[g] = sum;
      }
      if (!vis[u]) continue;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float sc = dot[g] + slope[g] * static_cast<float>(kp[u] - qp);
        const float mx = fmaxf(m[g], sc);
        const float f = m[g] == kNegInf ? 0.f : exp2f(m[g] - mx);
        const float pe = exp2f(sc - mx);
        l[g] = l[g] * f + pe;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(acc[g][e], f, pe * v[e]);
        m[g] = mx;
      }
    }
  }

  // Merge the key groups of a warp (lanes part, part + LANES, ...), then the warps through shared memory.
#pragma unroll
  for (int off = LANES; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float acc2[8];
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off), l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
      merge<8>(m[g], l[g], acc[g], m2, l2, acc2);
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (part == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][g][d0 + e] = acc[g][e];
    }
  }
  __syncthreads();
  float* ws = static_cast<float*>(p.workspace);
  for (int idx = tid; idx < G * D; idx += THREADS) {
    const int g = idx / D, d = idx % D, h = hk * G + g;
    float mm = kNegInf, ll = 0.f, aa = 0.f;
    for (int w = 0; w < WARPS; ++w) merge<1>(mm, ll, &aa, sm_m[w][g], sm_l[w][g], &sm_acc[w][g][d]);
    float* rec = ws + ((static_cast<int64_t>(b) * p.num_heads + h) * splits + split) * (D + 2);
    if (d == 0) {
      rec[0] = mm;
      rec[1] = ll;
    }
    rec[2 + d] = aa;
  }
}

// grid (H, B), block D: merge the splits of one head and write [B, 1, H * D].
template <typename T, int D>
__global__ void combine_kernel(BelleAttentionParams p, int splits) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const float* rec = static_cast<const float*>(p.workspace) +
                     (static_cast<int64_t>(b) * p.num_heads + h) * splits * (D + 2);
  const int n_keys = min(load_start(p) + 1, p.max_keys);
  const int chunk = split_chunk(n_keys, splits);
  const int live = min(splits, (n_keys + chunk - 1) / chunk);
  float mm = kNegInf, ll = 0.f, aa = 0.f;
  for (int s = 0; s < live; ++s, rec += D + 2) merge<1>(mm, ll, &aa, rec[0], rec[1], rec + 2 + d);
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.num_heads + h) * D;
  out[d] = Dtype<T>::from_float(ll > 0.f ? aa / ll : 0.f);
}

template <typename T, int D, int G>
cudaError_t launch_group(const BelleAttentionParams& p, cudaStream_t stream) {
  const int splits = decode_splits(p);
  decode_kernel<T, D, G><<<dim3(splits, p.num_kv_heads, p.batch), THREADS, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_kernel<T, D><<<dim3(p.num_heads, p.batch), D, 0, stream>>>(p, splits);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_dim(const BelleAttentionParams& p, cudaStream_t stream) {
  switch (p.num_heads / p.num_kv_heads) {
    case 1: return launch_group<T, D, 1>(p, stream);
    case 2: return launch_group<T, D, 2>(p, stream);
    case 3: return launch_group<T, D, 3>(p, stream);
    case 4: return launch_group<T, D, 4>(p, stream);
    case 5: return launch_group<T, D, 5>(p, stream);
    case 6: return launch_group<T, D, 6>(p, stream);
    case 7: return launch_group<T, D, 7>(p, stream);
    default: return launch_group<T, D, 8>(p, stream);  // api.cu refuses groups above kMaxGroup
  }
}

}  // namespace

int decode_splits(const BelleAttentionParams& p) {
  // Multiprocessors of the current device, asked at every call (cheap, allowed during graph capture): a
  // value cached once would be shared unsynchronised between threads and wrong on a second, different GPU.
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 16;
  const int by_length = std::max(1, (p.max_keys + MIN_KEYS_PER_SPLIT - 1) / MIN_KEYS_PER_SPLIT);
  const int by_gpu = std::max(1, (8 * sms + p.batch * p.num_kv_heads - 1) / (p.batch * p.num_kv_heads));
  return std::min(by_length, by_gpu);
}

int decode_splits_bound(const BelleAttentionParams& p) {
  return std::max(1, (p.max_keys + MIN_KEYS_PER_SPLIT - 1) / MIN_KEYS_PER_SPLIT);
}

cudaError_t launch_decode(const BelleAttentionParams& p, cudaStream_t stream) {
  if (p.dtype == BELLE_FP16)
    return p.head_dim == 64 ? launch_dim<__half, 64>(p, stream) : launch_dim<__half, 128>(p, stream);
  return p.head_dim == 64 ? launch_dim<__nv_bfloat16, 64>(p, stream) : launch_dim<__nv_bfloat16, 128>(p, stream);
}

}  // namespace belle

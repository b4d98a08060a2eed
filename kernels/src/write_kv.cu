// Writing the new keys and values into the KV cache in place (RoPE applied to the keys on the way).
#include "common.cuh"
#include "launch.h"

namespace belle {
namespace {

// grid (T, Hkv, B), block D/2 threads: thread i handles the RoPE pair (i, i + D/2) of one token's head.
template <typename T>
__global__ void write_kv_kernel(BelleAttentionParams p) {
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, i = threadIdx.x;
  const int half = p.head_dim / 2;
  const int slot = load_start(p) + t;
  // A device-side start is not checked on the host (api.cu cannot read it): never write past the cache.
  // The attention kernels clamp their key count to max_keys likewise, so bad tables give wrong numbers,
  // not a corrupted neighbour allocation.
  if (slot < 0 || slot >= p.cache_capacity) return;
  const int64_t src = b * p.kv_new_stride_b + h * p.kv_new_stride_h + t * p.kv_new_stride_t;
  const int64_t dst = ((static_cast<int64_t>(b) * p.num_kv_heads + h) * p.cache_capacity + slot) * p.head_dim;
  const T* k = static_cast<const T*>(p.k_new) + src;
  const T* v = static_cast<const T*>(p.v_new) + src;
  T* kc = static_cast<T*>(p.k_cache) + dst;
  T* vc = static_cast<T*>(p.v_cache) + dst;
  vc[i] = v[i];
  vc[i + half] = v[i + half];
  if (p.rope_inv_freq) {
    float c, s;
    rope_cos_sin(p.rope_inv_freq, i, p.q_pos[b * p.q_table_stride + t], c, s);
    const float x1 = Dtype<T>::to_float(k[i]), x2 = Dtype<T>::to_float(k[i + half]);
    kc[i] = Dtype<T>::from_float(x1 * c - x2 * s);
    kc[i + half] = Dtype<T>::from_float(x2 * c + x1 * s);
  } else {
    kc[i] = k[i];
    kc[i + half] = k[i + half];
  }
}

}  // namespace

cudaError_t launch_write_kv(const BelleAttentionParams& p, cudaStream_t stream) {
  dim3 grid(p.new_tokens, p.num_kv_heads, p.batch);
  if (p.dtype == BELLE_FP16)
    write_kv_kernel<__half><<<grid, p.head_dim / 2, 0, stream>>>(p);
  else
    write_kv_kernel<__nv_bfloat16><<<grid, p.head_dim / 2, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace belle

// Prefill: T new queries over the cached window + themselves, flash-attention style.
//
// One block = 64 queries of one (batch, head), 4 warps of 16 query rows each. The block walks the keys in
// tiles of 64: it first reads the tile's positions/turns and skips the whole tile when no key in it is
// visible to any of its queries (turns that left the window, keys after the last query) — the saving the
// turn window promises. Scores and P.V use tensor cores (mma.sync m16n8k16, fp32 accumulation); the softmax
// is online (running max and sum per row, in registers, FlashAttention-2 layout: each thread owns two rows).
// No [Q, K] mask exists anywhere: each score is masked from the tables as it is made.
#include "common.cuh"
#include "launch.h"

namespace belle {
namespace {

constexpr int BM = 64;       // queries per block
constexpr int BN = 64;       // keys per tile
constexpr int WARPS = 4;     // BM / 16
constexpr int THREADS = WARPS * 32;
constexpr int PAD = 8;       // halves of padding per shared row: rows land on distinct banks

template <int D>
struct Smem {
  static constexpr int row = D + PAD;
  static constexpr size_t bytes = 3 * BM * row * 2 + 4 * BM * sizeof(int64_t);
};

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) prefill_kernel(BelleAttentionParams p) {
  using DT = Dtype<T>;
  constexpr int ROW = Smem<D>::row;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * ROW;
  T* sV = sK + BN * ROW;
  int64_t* sQpos = reinterpret_cast<int64_t*>(sV + BN * ROW);
  int64_t* sQturn = sQpos + BM;
  int64_t* sKpos = sQturn + BM;
  int64_t* sKturn = sKpos + BN;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;  // MMA fragment coordinates
  const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int T_ = p.new_tokens;
  const int hk = h / (p.num_heads / p.num_kv_heads);
  const int n_keys = min(load_start(p) + T_, p.cache_capacity);  // a bad device-side start reads no further
  const int64_t window = *p.window, sinks = *p.sinks;
  const float slope = p.alibi_slopes ? DT::to_float(static_cast<const T*>(p.alibi_slopes)[h]) * kLog2e : 0.f;
  const float scale = p.scale * kLog2e;  // scores in log2 units: exp2 below

  // Query tables; rows past T get position -1, which sees no key.
  if (tid < BM) {
    const int q = q0 + tid;
    sQpos[tid] = q < T_ ? p.q_pos[b * p.q_table_stride + q] : -1;
    sQturn[tid] = q < T_ ? p.q_turn[b * p.q_table_stride + q] : 0;
  }
  __syncthreads();
  // Queries, rotated on load when the model uses RoPE (pair i, i + D/2 of LLaMA's half-split layout).
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  for (int e = tid; e < BM * D / 2; e += THREADS) {
    const int r = e / (D / 2), i = e % (D / 2), q = q0 + r;
    float x1 = 0.f, x2 = 0.f;
    if (q < T_) {
      x1 = DT::to_float(qg[q * p.q_stride_t + i]);
      x2 = DT::to_float(qg[q * p.q_stride_t + i + D / 2]);
      if (p.rope_inv_freq) {
        float cs, sn;
        rope_cos_sin(p.rope_inv_freq, i, sQpos[r], cs, sn);
        const float y1 = x1 * cs - x2 * sn, y2 = x2 * cs + x1 * sn;
        x1 = y1;
        x2 = y2;
      }
    }
    sQ[r * ROW + i] = DT::from_float(x1);
    sQ[r * ROW + i + D / 2] = DT::from_float(x2);
  }
  // The block's query extremes, for skipping whole key tiles (a conservative test: see below).
  int64_t qpos_max = -1, qturn_min = INT64_MAX, qpos_min = INT64_MAX, qturn_max = -1;
  for (int r = 0; r < BM && q0 + r < T_; ++r) {
    qpos_max = max(qpos_max, sQpos[r]);
    qpos_min = min(qpos_min, sQpos[r]);
    qturn_min = min(qturn_min, sQturn[r]);
    qturn_max = max(qturn_max, sQturn[r]);
  }
  __syncthreads();

  const int row0 = warp * 16 + g, row1 = row0 + 8;  // this thread's two rows (block-local)
  const int64_t qp0 = sQpos[row0], qp1 = sQpos[row1], qt0 = sQturn[row0], qt1 = sQturn[row1];
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    qf[kc][0] = *reinterpret_cast<const uint32_t*>(&sQ[row0 * ROW + kc * 16 + 2 * c]);
    qf[kc][1] = *reinterpret_cast<const uint32_t*>(&sQ[row1 * ROW + kc * 16 + 2 * c]);
    qf[kc][2] = *reinterpret_cast<const uint32_t*>(&sQ[row0 * ROW + kc * 16 + 2 * c + 8]);
    qf[kc][3] = *reinterpret_cast<const uint32_t*>(&sQ[row1 * ROW + kc * 16 + 2 * c + 8]);
  }
  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  float m0 = kNegInf, m1 = kNegInf, l0 = 0.f, l1 = 0.f;

  const int64_t kv_base = (static_cast<int64_t>(b) * p.num_kv_heads + hk) * p.cache_capacity;
  const T* kg = static_cast<const T*>(p.k_cache) + kv_base * D;
  const T* vg = static_cast<const T*>(p.v_cache) + kv_base * D;
  const int64_t* kpos_g = p.k_pos + b * p.k_table_stride;
  const int64_t* kturn_g = p.k_turn + b * p.k_table_stride;

  for (int j0 = 0; j0 < n_keys; j0 += BN) {
    // A key visible to some query of the block passes this test with the block's largest position and
    // smallest turn, so a tile where no key passes holds nothing visible: skip it whole.
    // Likewise a key visible to the block's smallest position and largest turn is visible to every query
    // of the block: when all keys of the tile are, the per-score mask is skipped (most live tiles).
    bool live = false, all = true;
    if (tid < BN) {
      const int j = j0 + tid;
      const int64_t kp = j < n_keys ? kpos_g[j] : INT64_MAX, kt = j < n_keys ? kturn_g[j] : 0;
      sKpos[tid] = kp;
      sKturn[tid] = kt;
      live = j < n_keys && visible(qpos_max, qturn_min, kp, kt, window, sinks);
      all = j < n_keys && visible(qpos_min, qturn_max, kp, kt, window, sinks);
    }
    if (!__syncthreads_or(live)) continue;
    const bool full = __syncthreads_and(all) && slope == 0.f;

    // K and V tiles, 16 bytes per load; rows past the last key are zero.
    constexpr int CHUNKS = D * 2 / 16;
    for (int e = tid; e < BN * CHUNKS; e += THREADS) {
      const int r = e / CHUNKS, ch = e % CHUNKS, j = j0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (j < n_keys) {
        kv = reinterpret_cast<const uint4*>(kg + static_cast<int64_t>(j) * D)[ch];
        vv = reinterpret_cast<const uint4*>(vg + static_cast<int64_t>(j) * D)[ch];
      }
      reinterpret_cast<uint4*>(sK + r * ROW)[ch] = kv;
      reinterpret_cast<uint4*>(sV + r * ROW)[ch] = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys: 8 tiles of 16x8.
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // lane l addresses key nt*8 + l%8, dims kc*16 + (l/8)*8: B fragments of two 16-dim chunks at once
      const T* krow = sK + (nt * 8 + (lane & 7)) * ROW + (lane >> 3) * 8;
#pragma unroll
      for (int kc = 0; kc < D / 16; kc += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, krow + kc * 16);
        DT::mma(s[nt], qf[kc], b[0], b[1]);
        DT::mma(s[nt], qf[kc + 1], b[2], b[3]);
      }
    }
    // Mask from the tables, scale, ALiBi; row maxima.
    float mx0 = kNegInf, mx1 = kNegInf;
    if (full) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][0] *= scale;
        s[nt][1] *= scale;
        s[nt][2] *= scale;
        s[nt][3] *= scale;
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
      }
    } else {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * c + (e & 1);
        const int64_t kp = sKpos[col], kt = sKturn[col];
        const bool top = e < 2;
        const int64_t qp = top ? qp0 : qp1, qt = top ? qt0 : qt1;
        float v = kNegInf;
        if (j0 + col < n_keys && visible(qp, qt, kp, kt, window, sinks))
          v = s[nt][e] * scale + slope * static_cast<float>(kp - qp);
        s[nt][e] = v;
        if (top) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
    }
    }
    // A row's 64 scores live in the 4 threads of its quad.
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
    // Rows with nothing visible yet keep m = -inf: guard the exponentials against inf - inf.
    const float f0 = m0 == kNegInf ? 0.f : exp2f(m0 - new0);
    const float f1 = m1 == kNegInf ? 0.f : exp2f(m1 - new1);
    m0 = new0;
    m1 = new1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool top = e < 2;
        const float v = s[nt][e];
        const float pe = v == kNegInf ? 0.f : exp2f(v - (top ? new0 : new1));
        s[nt][e] = pe;
        if (top) sum0 += pe; else sum1 += pe;
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
    }
    l0 = l0 * f0 + sum0;
    l1 = l1 * f1 + sum1;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= f0;
      o[dn][1] *= f0;
      o[dn][2] *= f1;
      o[dn][3] *= f1;
    }
    // O += P V: the score tiles' accumulator layout is the A-operand layout of the next MMA.
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[4];
      a[0] = DT::pack(s[2 * kc][0], s[2 * kc][1]);
      a[1] = DT::pack(s[2 * kc][2], s[2 * kc][3]);
      a[2] = DT::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = DT::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
      // lane l addresses key kc*16 + l%8 + ((l/8)&1)*8, dims (l/16)*8: transposed, B fragments of two
      // 8-dim output tiles at once
      const T* vrow = sV + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + (lane >> 4) * 8;
#pragma unroll
      for (int dn = 0; dn < D / 8; dn += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vrow + dn * 8);
        DT::mma(o[dn], a, b[0], b[1]);
        DT::mma(o[dn + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the next tile overwrites sK / sV
  }

  // Normalise and write [B, T, H * D].
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int qa = q0 + row0, qb = q0 + row1;
  T* out = static_cast<T*>(p.out);
  const int64_t width = static_cast<int64_t>(p.num_heads) * D;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int col = h * D + dn * 8 + 2 * c;
    if (qa < T_) {
      T* dst = out + (static_cast<int64_t>(b) * T_ + qa) * width + col;
      dst[0] = DT::from_float(o[dn][0] * inv0);
      dst[1] = DT::from_float(o[dn][1] * inv0);
    }
    if (qb < T_) {
      T* dst = out + (static_cast<int64_t>(b) * T_ + qb) * width + col;
      dst[0] = DT::from_float(o[dn][2] * inv1);
      dst[1] = DT::from_float(o[dn][3] * inv1);
    }
  }
}

template <typename T, int D>
cudaError_t launch(const BelleAttentionParams& p, cudaStream_t stream) {
  const size_t smem = Smem<D>::bytes;
  cudaError_t err = cudaFuncSetAttribute(prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  dim3 grid((p.new_tokens + BM - 1) / BM, p.num_heads, p.batch);
  prefill_kernel<T, D><<<grid, THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_prefill(const BelleAttentionParams& p, cudaStream_t stream) {
  if (p.dtype == BELLE_FP16)
    return p.head_dim == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace belle

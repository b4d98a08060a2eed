// The host-side launchers of each kernel file, called by api.cu after it has validated the parameters.
#pragma once

#include <cuda_runtime.h>

#include "belle_attention.h"

namespace belle {

// Writes the T new keys (RoPE-rotated when p.rope_inv_freq) and values into the cache at [start, start + T).
cudaError_t launch_write_kv(const BelleAttentionParams& p, cudaStream_t stream);
// T > 1: flash-attention style prefill over slots [0, start + T).
cudaError_t launch_prefill(const BelleAttentionParams& p, cudaStream_t stream);
// T == 1: split-KV decode (flash-decoding) + the combine pass.
cudaError_t launch_decode(const BelleAttentionParams& p, cudaStream_t stream);
// How many KV chunks the decode kernel splits max_keys into (also sizes the workspace).
int decode_splits(const BelleAttentionParams& p);
// An upper bound of decode_splits that does not depend on the GPU (an engine built ahead of time, with no
// GPU present, sizes its workspace with it).
int decode_splits_bound(const BelleAttentionParams& p);

constexpr int kMaxGroup = 8;  // query heads per kv head the decode kernel is instantiated for

}  // namespace belle

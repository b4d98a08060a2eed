// The C entry points of belle_attention.h: check the parameters, write the new K/V, run prefill or decode.
#include "belle_attention.h"
#include "launch.h"

namespace {

enum : int {
  kBadHeadDim = -1,
  kBadHeads = -2,
  kBadGroup = -3,
  kBadTokens = -4,
  kCacheFull = -5,
  kNullPointer = -6,
  kNoWorkspace = -7,
  kBadDtype = -8,
};

int check(const BelleAttentionParams* p) {
  if (!p || !p->q || !p->k_new || !p->v_new || !p->k_cache || !p->v_cache || !p->q_pos || !p->q_turn ||
      !p->k_pos || !p->k_turn || !p->window || !p->sinks || !p->out)
    return kNullPointer;
  if (p->dtype != BELLE_FP16 && p->dtype != BELLE_BF16) return kBadDtype;
  if (p->head_dim != 64 && p->head_dim != 128) return kBadHeadDim;
  if (p->num_heads <= 0 || p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads || p->batch <= 0)
    return kBadHeads;
  if (p->new_tokens < 1) return kBadTokens;
  if (p->new_tokens == 1 && p->num_heads / p->num_kv_heads > belle::kMaxGroup) return kBadGroup;
  if (!p->start_device && (p->start < 0 || p->start + p->new_tokens > p->cache_capacity)) return kCacheFull;
  if (p->max_keys < 1 || p->max_keys > p->cache_capacity) return kCacheFull;
  if (!p->start_device && p->start + p->new_tokens > p->max_keys) return kCacheFull;
  if (p->new_tokens == 1 && !p->workspace) return kNoWorkspace;
  return 0;
}

}  // namespace

extern "C" size_t belle_attention_workspace_size(const BelleAttentionParams* p) {
  if (!p || p->new_tokens != 1) return 0;
  return static_cast<size_t>(p->batch) * p->num_heads * belle::decode_splits_bound(*p) * (p->head_dim + 2) *
         sizeof(float);
}

extern "C" int belle_attention_forward(const BelleAttentionParams* p, void* stream) {
  const int bad = check(p);
  if (bad) return bad;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = belle::launch_write_kv(*p, s);
  if (err != cudaSuccess) return err;
  err = p->new_tokens == 1 ? belle::launch_decode(*p, s) : belle::launch_prefill(*p, s);
  return err;
}

extern "C" const char* belle_attention_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case kBadHeadDim: return "head_dim must be 64 or 128";
    case kBadHeads: return "num_heads must be a positive multiple of num_kv_heads (and batch > 0)";
    case kBadGroup: return "decode supports at most 8 query heads per kv head";
    case kBadTokens: return "new_tokens must be >= 1";
    case kCacheFull: return "start + new_tokens exceeds max_keys or cache_capacity";
    case kNullPointer: return "a required pointer is NULL";
    case kNoWorkspace: return "decode needs a workspace of belle_attention_workspace_size bytes";
    case kBadDtype: return "dtype must be BELLE_FP16 or BELLE_BF16";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

"""BLOOM family (BELLE-7B on BLOOMZ-7b1-mt): ALiBi, LayerNorm, GELU MLP, embedding LayerNorm, fused QKV.

BLOOM stores Q, K and V fused and interleaved per head ([heads, 3, head_dim] rows); the canonical model keeps
them apart, so pruning and export treat both families alike. ALiBi slopes become per-layer buffers.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError, UnsupportedModelError
from .config import MAX_SIZE, ModelConfig, hf_bos_id, hf_eos_ids, hf_flag, hf_positive, hf_size
from .convert import rename_layers, split_fused
from .positions import alibi_slopes


_NAMES = {
    "embed.weight": "word_embeddings.weight",
    "embed_norm.weight": "word_embeddings_layernorm.weight",
    "embed_norm.bias": "word_embeddings_layernorm.bias",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "attn.qkv.weight": "self_attention.query_key_value.weight",
    "attn.qkv.bias": "self_attention.query_key_value.bias",
    "attn.o_proj.weight": "self_attention.dense.weight",
    "attn.o_proj.bias": "self_attention.dense.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.bias": "post_attention_layernorm.bias",
    "mlp.up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.up_proj.bias": "mlp.dense_h_to_4h.bias",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
    "mlp.down_proj.bias": "mlp.dense_4h_to_h.bias",
}
_LAYER_PREFIX = ("layers.{i}.", "h.{i}.")
_DEFAULT_POSITIONS = 2048  # BLOOM was trained on 2,048-token sequences; ALiBi itself has no table


def config_from_hf(hf: dict, *, where: str) -> ModelConfig:
    if hf_flag(hf, "apply_residual_connection_post_layernorm", where, False):
        raise UnsupportedModelError(f"{where}: apply_residual_connection_post_layernorm=true is not supported")
    # fields checked for type and range as they are read (fuzzing found a string size to raise TypeError below)
    hidden = hf_size(hf, "hidden_size", where, default=0) or hf_size(hf, "n_embed", where)
    heads = hf_size(hf, "n_head", where, default=0) or hf_size(hf, "num_attention_heads", where)
    layers = hf_size(hf, "n_layer", where, default=0) or hf_size(hf, "num_hidden_layers", where)
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by n_head {heads}")
    if 4 * hidden > MAX_SIZE:  # BLOOM's MLP is 4 x hidden
        raise CheckpointError(f"{where}: config field 'hidden_size': expected at most {MAX_SIZE // 4}, got {hidden}")
    return ModelConfig(
        family="bloom",
        vocab_size=hf_size(hf, "vocab_size", where),
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_positions=hf_size(hf, "seq_length", where, default=_DEFAULT_POSITIONS),
        norm_eps=hf_positive(hf, "layer_norm_epsilon", where, 1e-5),
        norm="layer", mlp="gelu", positions="alibi",
        tie_embeddings=hf_flag(hf, "tie_word_embeddings", where, True),
        embed_norm=True, attention_bias=True, mlp_bias=True,
        bos_token_id=hf_bos_id(hf, where), eos_token_ids=hf_eos_ids(hf, where),
    )


def state_dict_from_hf(sd: dict, cfg: ModelConfig, *, where: str) -> dict:
    # some BLOOM checkpoints prefix "transformer.", others (bloom-560m) do not
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    lm_head = sd.pop("lm_head.weight", None)
    out, leftover = rename_layers(sd, _NAMES, _LAYER_NAMES, _LAYER_PREFIX, cfg.num_layers, to_canonical=True)
    if leftover:
        raise CheckpointError(f"{where}: weights the BLOOM config does not account for: {sorted(leftover)[:3]}")
    if not cfg.tie_embeddings:
        if lm_head is None:
            raise CheckpointError(f"{where}: tie_word_embeddings is false but lm_head.weight is missing")
        out["lm_head.weight"] = lm_head
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        for kind in ("weight", "bias"):
            fused = out.pop(p + "qkv." + kind, None)
            if fused is None:
                raise CheckpointError(f"{where}: h.{i}.self_attention.query_key_value.{kind} is missing")
            q, k, v = split_fused(fused, 3, cfg.num_heads, where, f"h.{i}.self_attention.query_key_value.{kind}")
            out[p + "q_proj." + kind], out[p + "k_proj." + kind], out[p + "v_proj." + kind] = q, k, v
        out[p + "alibi_slopes"] = alibi_slopes(cfg.num_heads)
    return out


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    sd = dict(sd)
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        sd.pop(p + "alibi_slopes")
        for kind in ("weight", "bias"):
            q, k, v = (sd.pop(p + n + "." + kind) for n in ("q_proj", "k_proj", "v_proj"))
            stacked = torch.stack([t.reshape(cfg.num_heads, cfg.head_dim, *t.shape[1:]) for t in (q, k, v)], dim=1)
            sd[p + "qkv." + kind] = stacked.reshape(3 * cfg.q_size, *q.shape[1:])
    lm_head = sd.pop("lm_head.weight", None)
    out, leftover = rename_layers(sd, _NAMES, _LAYER_NAMES, _LAYER_PREFIX, cfg.num_layers, to_canonical=False)
    assert not leftover, leftover
    out = {"transformer." + k: v for k, v in out.items()}
    if lm_head is not None:
        out["lm_head.weight"] = lm_head
    return out


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "seq_length": cfg.max_positions, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) or None,
    }

"""LLaMA family (BELLE-LLaMA, BELLE-LLaMA-EXT, Llama-2 chat, SmolLM2): RoPE, RMSNorm, SwiGLU, GQA.

Maps a Hugging Face ``LlamaConfig`` and state dict onto the canonical ones and back.
"""
from __future__ import annotations

from ..errors import CheckpointError, UnsupportedModelError
from .config import ModelConfig, hf_bos_id, hf_eos_ids, hf_flag, hf_object, hf_positive, hf_size
from .convert import rename_layers


# canonical name -> Hugging Face name; "{i}" is the layer index
_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
}
_LAYER_PREFIX = ("layers.{i}.", "model.layers.{i}.")


def config_from_hf(hf: dict, *, where: str) -> ModelConfig:
    # every field is checked for its type and range as it is read (hf_size, hf_positive, ...): fuzzing found a
    # string size, 0 heads or a string rope_scaling to raise TypeError / ZeroDivisionError / AttributeError here
    rope = hf_object(hf, "rope_parameters", where) or hf_object(hf, "rope_scaling", where)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = hf_positive(hf, "rope_theta", where, 10000.0)
    if rope.get("rope_theta") is not None:
        rope_key = "rope_parameters" if hf_object(hf, "rope_parameters", where) else "rope_scaling"
        theta = hf_positive(hf, f"{rope_key}.rope_theta", where, theta, value=rope["rope_theta"])
    hidden = hf_size(hf, "hidden_size", where)
    heads = hf_size(hf, "num_attention_heads", where)
    kv_heads = hf_size(hf, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = hf_size(hf, "head_dim", where, default=hidden // heads)
    if not head_dim:
        raise CheckpointError(f"{where}: hidden_size {hidden} is smaller than num_attention_heads {heads} and "
                              "there is no head_dim")
    return ModelConfig(
        family="llama",
        vocab_size=hf_size(hf, "vocab_size", where),
        hidden_size=hidden,
        num_layers=hf_size(hf, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=hf_size(hf, "intermediate_size", where),
        max_positions=hf_size(hf, "max_position_embeddings", where, default=2048),
        norm_eps=hf_positive(hf, "rms_norm_eps", where, 1e-6),
        norm="rms", mlp="swiglu", positions="rope",
        tie_embeddings=hf_flag(hf, "tie_word_embeddings", where, False),
        attention_bias=hf_flag(hf, "attention_bias", where, False),
        mlp_bias=hf_flag(hf, "mlp_bias", where, False),
        rope_theta=theta,
        bos_token_id=hf_bos_id(hf, where),
        eos_token_ids=hf_eos_ids(hf, where),
    )


def state_dict_from_hf(sd: dict, cfg: ModelConfig, *, where: str) -> dict:
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints saved these
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    out, leftover = rename_layers(sd, _NAMES, _LAYER_NAMES, _LAYER_PREFIX, cfg.num_layers, to_canonical=True)
    if leftover:
        raise CheckpointError(f"{where}: weights the LLaMA config does not account for: {sorted(leftover)[:3]}")
    return out


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    out, leftover = rename_layers(sd, _NAMES, _LAYER_NAMES, _LAYER_PREFIX, cfg.num_layers, to_canonical=False)
    assert not leftover, leftover
    return out


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
        "rope_theta": cfg.rope_theta, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) or None,
    }

"""Qwen2 family (Qwen2 / Qwen2.5 chat models, the Chinese-speaking default): LLaMA's layout — RoPE, RMSNorm,
SwiGLU, GQA — plus biases on q/k/v (none on o_proj), its RoPE base and norm epsilon from the checkpoint,
a tied or untied head. Checkpoint names are LLaMA's, so the name maps are llama.py's.

Sliding-window attention (``use_sliding_window``) is refused: the turn window is our only mask besides
causal, and Qwen2.5 chat checkpoints ship with it off.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from . import llama
from .config import ModelConfig, hf_flag


def config_from_hf(hf: dict, *, where: str) -> ModelConfig:
    if hf_flag(hf, "use_sliding_window", where, False):
        raise UnsupportedModelError(f"{where}: use_sliding_window=true is not supported (only full attention)")
    base = llama.config_from_hf({**hf, "attention_bias": False, "mlp_bias": False}, where=where)
    return base.replace(family="qwen2", qkv_bias=True)  # llama's reading already took rms_norm_eps, checked


def state_dict_from_hf(sd: dict, cfg: ModelConfig, *, where: str) -> dict:
    return llama.state_dict_from_hf(sd, cfg, where=where)


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    return llama.state_dict_to_hf(sd, cfg)


def hf_config(cfg: ModelConfig) -> dict:
    out = llama.hf_config(cfg)
    for key in ("attention_bias", "mlp_bias"):  # Qwen2Config has no such fields: its biases are fixed
        out.pop(key)
    return {**out, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
            "max_window_layers": cfg.num_layers}

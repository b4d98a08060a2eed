"""Fidelity of a compiled model to the fp32 canonical model: teacher-forced KL divergence and top-1
agreement on held-out text (CPython's ``pydoc_data.topics``: real English prose on every machine).
The same measure serves quantization now and pruning later."""
from __future__ import annotations

import numpy as np


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def logit_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """KL(reference || candidate) per token (mean, p95) and top-1 agreement, over (T, V) logits."""
    import torch

    from ..core.fidelity import compare

    return compare(torch.from_numpy(reference), torch.from_numpy(candidate))


def measure_fidelity(ckpt, onnx_path: str, *, tokens: int = 512, chunk: int = 256) -> dict:
    """Compare the ONNX model (run by onnxruntime) with the fp32 canonical model on held-out text."""
    import torch

    from ..mask import MaskConfig
    from ..models.decoder import Decoder
    from ..runtime.backends.ort_backend import make_session

    ids = np.asarray(ckpt.tokenizer.encode(held_out_text()).ids[:tokens], dtype=np.int64)
    reference = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)[None], np.arange(len(ids)), np.zeros(len(ids), dtype=np.int64),
                        MaskConfig.off())[0].numpy()
    got = run_onnx_logits(make_session(onnx_path), ckpt.config, ids, chunk=chunk)
    return {"text": "pydoc_data.topics", **logit_agreement(ref, got)}


def run_onnx_logits(session, cfg, ids: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """Teacher-forced logits (T, V) for ``ids`` through an exported graph, in chunks over its KV cache."""
    from ..mask import WINDOW_OFF

    kv_input = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    kv_type = np.float16 if "float16" in kv_input.type else np.float32
    past = {f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), kv_type)
            for i in range(cfg.num_layers) for k in ("key", "value")}
    out = []
    for a in range(0, len(ids), chunk):
        b = min(a + chunk, len(ids))
        feeds = {"input_ids": ids[None, a:b], "position_ids": np.arange(a, b)[None],
                 "turn_ids": np.zeros((1, b - a), np.int64), "past_position_ids": np.arange(a)[None],
                 "past_turn_ids": np.zeros((1, a), np.int64), "mask_window": np.array(WINDOW_OFF),
                 "mask_sinks": np.array(0), "num_logits_to_keep": np.array(b - a), **past}
        names = ["logits"] + [f"present.{i}.{k}" for i in range(cfg.num_layers) for k in ("key", "value")]
        results = session.run(names, feeds)
        out.append(results[0][0])
        past = {f"past_key_values.{n[len('present.'):]}": r for n, r in zip(names[1:], results[1:])}
    return np.concatenate(out)

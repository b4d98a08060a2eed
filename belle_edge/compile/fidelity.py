"""The fidelity stage: how closely the exported ONNX (run by onnxruntime) follows the model before
quantization (the fp32 canonical model), teacher-forced on held-out text — English and Chinese, never the
calibration half (core/texts.py).

Details recorded: ``kl_mean``, ``kl_p95``, ``top1_agreement``, ``tokens`` over all held-out tokens
(``tokens`` in all, split evenly between the texts), ``texts`` (the same figures per text) and ``reference``
(the checkpoint compared against); or ``skipped`` with the reason, when a quantized checkpoint is exported
on a machine without the model it was quantized from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.stage import measured
from ..core.texts import held_out_texts
from ..manifest import StageRecord

if TYPE_CHECKING:
    from .job import Job


@dataclass(frozen=True)
class FidelityStage:
    tokens: int = 512  # held-out tokens in all

    name = "fidelity"
    reads = "model.onnx of the artifact, and the model before quantization"
    writes = "nothing: figures in the manifest"

    def run(self, job: "Job") -> StageRecord:
        return measured(self, lambda: self._measure(job), reads="model.onnx")

    def _measure(self, job: "Job") -> dict:
        import os

        from ..core.load import load_checkpoint

        reference = job.reference
        if reference is None:  # a quantized checkpoint exported alone: the model it was quantized from
            if not job.reference_path or not os.path.exists(job.reference_path):
                return {"skipped": f"the model it was quantized from ({job.reference_path}) is not on this machine"}
            reference = load_checkpoint(job.reference_path)
        return measure_fidelity(reference, os.path.join(job.artifact, "model.onnx"), tokens=self.tokens)


def measure_fidelity(ckpt, onnx_path: str, *, tokens: int = 512, chunk: int = 256) -> dict:
    """Compare the ONNX model with ``ckpt``'s fp32 canonical model on each held-out text."""
    import torch

    from ..core.fidelity import compare
    from ..mask import MaskConfig
    from ..models.decoder import Decoder
    from ..runtime.backends.ort_backend import make_session

    texts = held_out_texts()
    reference = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    session = make_session(onnx_path, exact_weight_only=True)  # as a GPU computes a weight-only MatMul
    refs, gots, per_text = [], [], {}
    for i, (name, text) in enumerate(texts.items()):
        share = tokens // len(texts) + (i < tokens % len(texts))  # the shares add up to ``tokens``
        ids = np.asarray(ckpt.tokenizer.encode(text).ids[:max(2, share)], dtype=np.int64)
        with torch.no_grad():
            ref = reference(torch.from_numpy(ids)[None], np.arange(len(ids)), np.zeros(len(ids), dtype=np.int64),
                            MaskConfig.off())[0].numpy()
        got = run_onnx_logits(session, ckpt.config, ids, chunk=chunk)
        per_text[name] = compare(torch.from_numpy(ref), torch.from_numpy(got))
        refs.append(ref)
        gots.append(got)
    pooled = compare(torch.from_numpy(np.concatenate(refs)), torch.from_numpy(np.concatenate(gots)))
    return {**pooled, "texts": per_text, "reference": ckpt.source}


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

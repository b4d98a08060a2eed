"""The load stage: the checkpoint to compile, into memory — a Hugging Face directory, a GGUF file, the
default model (core/load.py), or a quantized checkpoint written by the quantize stage (core/quantized.py).

Details recorded: ``source``, ``kind``, ``family``, and, when no prune stage follows, the memory budget of
the target (``memory``: parameters, weights/KV GiB, decode roofline), refused here before any slow stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.load import load_checkpoint
from ..core.quantized import is_quantized_checkpoint, read_quantized
from ..core.stage import measured
from ..manifest import Source, StageRecord
from ..targets import MemoryBudget

if TYPE_CHECKING:
    from .job import Job


@dataclass(frozen=True)
class LoadStage:
    model: str | None  # None: the default model
    allow_pickle: bool = False
    chat_format: str = "auto"
    budget: MemoryBudget | None = None  # checked here when the model that ships is this one (no pruning)

    name = "load"
    reads = "checkpoint: Hugging Face directory, GGUF file, or quantized checkpoint folder"
    writes = "nothing: the model in memory"

    def run(self, job: "Job") -> StageRecord:
        return measured(self, lambda: self._load(job), reads=self.model or "default model")

    def _load(self, job: "Job") -> dict:
        if self.model is not None and is_quantized_checkpoint(self.model):
            ckpt, doc = read_quantized(self.model)
            job.reference_path = doc["source"]["path"]  # fidelity compares with the model it was quantized from
        else:
            ckpt = load_checkpoint(self.model, allow_pickle=self.allow_pickle, chat_format=self.chat_format)
            job.reference = ckpt
        job.hand_on(ckpt.source, ckpt)
        job.source = Source(path=ckpt.source, kind=ckpt.kind, fingerprint=ckpt.fingerprint,
                            name=source_name(self.model, ckpt.source))
        details = {"source": ckpt.source, "kind": ckpt.kind, "family": ckpt.config.family}
        if self.budget is not None:  # a model too big for the target may still fit once pruned
            details["memory"] = self.budget.check(ckpt.config, ckpt.parameters)
        return details


def source_name(model: str | None, source: str) -> str:
    """For people: the title of a model known by name (or the default), else the file or folder name."""
    from ..default_model import DEFAULT
    from ..known_models import known_model

    known = known_model(DEFAULT if model is None else model)
    return known.title if known is not None else os.path.basename(source.rstrip("/"))

"""``Job``: one compile in progress — the folder it writes, the model the next stage reads, and what the
stages before left for the ones after. Stages hand a model on through a folder on disk (``hand_on``);
the job also keeps it in memory, so the next stage does not read back what was just written.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from ..core.checkpoint import Checkpoint
from ..manifest import Engine, Manifest, Source, StageRecord

SCRATCH = ".stages"  # inside the artifact folder: hidden, never listed in the manifest, removed at the end


@dataclass
class Job:
    artifact: str  # the artifact folder being written (a hidden work folder until the compile succeeds)
    model_path: str | None = None  # the checkpoint the next stage reads: a path, or None for the default model
    loaded: Checkpoint | None = None  # that checkpoint, once a stage has it in memory
    reference: Checkpoint | None = None  # what the fidelity stage compares against: the model before quantizing
    reference_path: str | None = None  # or where to read it (a quantized checkpoint names its source)
    source: Source | None = None  # the checkpoint being compiled (manifest.source)
    exported: Checkpoint | None = None  # the model the ONNX holds
    export: dict | None = None  # the export stage's facts: dtype, attention
    engine: Engine | None = None
    previous: Manifest | None = None  # the manifest of an artifact being extended (build-engine)
    records: list[StageRecord] = field(default_factory=list)
    manifest: Manifest | None = None  # what the package stage wrote

    def checkpoint(self) -> Checkpoint:
        """The model the next stage works on (the load stage puts it in memory first)."""
        if self.loaded is None:
            raise RuntimeError("no checkpoint loaded: the load stage runs first")
        return self.loaded

    def hand_on(self, path: str, ckpt: Checkpoint) -> None:
        """The next stage reads ``path`` (written by the stage now ending), whose model is ``ckpt``."""
        self.model_path, self.loaded = path, ckpt

    def scratch(self, name: str) -> str:
        """A folder for a stage's intermediate output (a pruned or quantized checkpoint), not yet created."""
        return os.path.join(self.artifact, SCRATCH, name)

    def drop_scratch(self) -> None:
        shutil.rmtree(os.path.join(self.artifact, SCRATCH), ignore_errors=True)

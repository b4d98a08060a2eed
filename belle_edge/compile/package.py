"""The package stage: the artifact's ``manifest.json`` (manifest.py), written last, so a folder holding
one is a whole artifact. A new artifact's manifest is made from what the stages left in the job; an
existing one (``belle-edge build-engine``) gets the new engine and stage records and is replaced in one
rename. Details recorded: none beyond the stage's time and memory.
"""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .. import __version__
from ..core.stage import measured
from ..manifest import FORMAT, MANIFEST, VERSION, Manifest, Runtime, StageRecord, write_manifest
from ..targets import Target

if TYPE_CHECKING:
    from .job import Job

TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy", "gguf")


@dataclass(frozen=True)
class PackageStage:
    target: Target
    precision: str
    settings: dict = field(default_factory=dict)  # the compile request, recorded as given

    name = "package"
    reads = "what the stages before left in the job"
    writes = MANIFEST

    def run(self, job: "Job") -> StageRecord:
        record = measured(self, lambda: {}, writes=(MANIFEST,))
        manifest = self._manifest(job, [*job.records, record])
        job.manifest = write_manifest(job.artifact, manifest)  # last: a folder with a manifest is whole
        return record

    def _manifest(self, job: "Job", records: list[StageRecord]) -> Manifest:
        if job.previous is not None:  # an artifact gaining its engine
            runtime = replace(job.previous.runtime, engine=job.engine, engine_on_device=False)
            return job.previous.replace(runtime=runtime, stages=(*job.previous.stages, *records))
        ckpt, export = job.exported, job.export
        runtime = Runtime(backend="tensorrt" if self.target.gpu else "onnxruntime", onnx=export["onnx"],
                          attention=export["attention"], kv_dtype=export["dtype"],
                          max_positions=ckpt.config.max_positions, stop_token_ids=tuple(sorted(ckpt.stop_token_ids)),
                          fingerprint=f"{ckpt.fingerprint}-{self.target.name}-{self.precision}", engine=job.engine,
                          engine_on_device=self.target.builds_on_device and job.engine is None,
                          mask_rule=export.get("mask_rule", 1))
        return Manifest(format=FORMAT, version=VERSION, belle_edge=__version__,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        source=job.source, model=ckpt.config, target=self.target.name, precision=self.precision,
                        settings=self.settings, runtime=runtime, chat_format=ckpt.chat_format.to_dict(),
                        tools=tool_versions(), stages=tuple(records))


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions

"""The build stage on an artifact compiled without an engine — an Orin artifact, on the Jetson itself, or a
GPU artifact exported on a laptop (``belle-edge build-engine``). Torch-free: it needs the artifact,
TensorRT and numpy, so it imports none of the stages that need torch.
"""
from __future__ import annotations

from ..errors import InputError
from ..manifest import StageRecord, read_manifest
from ..targets import Target, get_target
from ..core.stage import run_stages
from .build_engine import EngineStage, choose_builder, no_builder_error
from .job import Job
from .package import PackageStage


def build_artifact_engine(artifact: str, *, flavour: str | None = None, progress: bool = False) -> StageRecord:
    """Build the engine of a GPU artifact compiled without one (an Orin artifact, on the Jetson itself).

    Torch-free: it needs the artifact, TensorRT and numpy. The engine is written first and the manifest
    last, replaced in one rename, so an interrupted build leaves the artifact as it was.
    """
    manifest = read_manifest(artifact)
    target = get_target(manifest.target)
    if not target.gpu:
        raise InputError(f"{artifact}: a {manifest.target} artifact runs on {manifest.runtime.backend}; it has no "
                         "engine to build")
    if manifest.runtime.engine is not None:
        raise InputError(f"{artifact}: already has {manifest.runtime.engine.file}; compile again to rebuild it")
    builder = _builder_for(target, flavour)
    settings = manifest.settings
    job = Job(artifact=artifact, previous=manifest)
    run_stages(job, [EngineStage(target, builder, manifest.runtime.attention, int(settings.get("max_prefill", 512)),
                                 int(settings.get("max_kv_tokens", 4096)),
                                 int(settings.get("max_batch") or target.max_batch)),
                     PackageStage(target, manifest.precision, settings)], progress=progress)
    return job.records[0]


def _builder_for(target: Target, flavour: str | None):
    if flavour == "tensorrt_rtx" and "tensorrt-rtx" not in target.builders:
        raise InputError(f"--tensorrt tensorrt_rtx: TensorRT-RTX cannot build for sm_{target.sm} ({target.name}); "
                         f"its engines are built by {' or '.join(target.builders)}")
    builder = choose_builder(target, flavour)
    if builder is None:
        raise no_builder_error(target)
    return builder

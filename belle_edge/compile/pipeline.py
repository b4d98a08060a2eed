"""``compile_model()``: the stages chosen for the target and precision, run in order, each recording itself
in the artifact's manifest::

    cpu:           load ─▶ [prune] ─▶ [quantize: int8/int4] ─▶ export (ort flavor) ─▶ [fidelity: not fp32] ─▶ package
    rtx3090, a100: load ─▶ [prune] ─▶ [quantize: int8/int4 weight-only] ─▶ export (portable fp16)
                   ─▶ [fidelity: int8/int4] ─▶ build (TensorRT engine + plugin) ─▶ package
    orin:          the same without build (the engine is built on the Jetson)

Each stage is one module (load.py, prune/stage.py, quantize.py, export_onnx.py, fidelity.py,
build_engine.py, package.py) with a ``Stage`` (core/stage.py); stages hand the model on through folders
(compile/job.py), so each also runs alone: ``belle-edge prune``, ``quantize``, ``export`` (a checkpoint or
quantized checkpoint to an artifact) and ``build-engine`` (an artifact's engine, on the device or later).

The artifact is built in a hidden sibling folder and renamed into place at the end (core/folders.py), so a
failed or interrupted compile never leaves a folder that looks complete.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..core.folders import staged_folder
from ..core.quantized import is_quantized_checkpoint, quantized_layout, quantized_precision
from ..core.stage import Stage, run_stages
from ..default_model import DEFAULT
from ..errors import InputError
from ..manifest import Manifest
from ..targets import MemoryBudget, check_precision, get_target
from .build_engine import EngineStage, choose_builder, no_builder_error
from .export_onnx import ExportStage
from .fidelity import FidelityStage
from .job import Job
from .load import LoadStage
from .package import PackageStage
from .prune.prune import PruneRequest
from .prune.stage import PruneStage
from .quantize import PRECISION_BITS, QuantizeStage
from .weight_only import LAYOUT, WeightOnlyRequest

ATTENTION = ("plugin", "native")
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class CompileConfig:
    out: str
    model: str | None = None  # None: the default model
    target: str = "cpu"
    precision: str | None = None  # None: fp32 on cpu, fp16 on a GPU target (a quantized checkpoint: its own)
    force: bool = False
    chat_format: str = "auto"
    allow_pickle: bool = False
    block_size: int = 32
    fidelity_tokens: int = 512  # held-out tokens for the quantized-vs-fp32 check
    max_kv_tokens: int = 4096  # the KV cache the memory check budgets for
    attention: str = "plugin"  # GPU targets: our plugin layer, or "native" (TensorRT's attention + explicit mask)
    engine: bool = True  # GPU targets: build the engine here (False: later, with `belle-edge build-engine`)
    max_prefill: int = 512  # GPU engines: the prefill profile's longest chunk
    max_batch: int | None = None  # GPU engines: sequences per step (None: the target's default, targets.py)
    prune: PruneRequest | None = None  # structured pruning right after load
    quant_method: str | None = None  # GPU int4/int8: "awq" | "rtn" (None: awq for int4, rtn for int8)
    head: str = "fp16"  # GPU int4/int8: the LM head (and a tied embedding) in "fp16" or "int8"
    calibration_tokens: int = 512  # GPU int4/int8 with awq
    int8_share: float = 0.0  # GPU int4: the share of linear parameters kept at INT8 (the most sensitive tensors)

    def __post_init__(self):
        target = get_target(self.target)
        if self.precision is None:
            own = quantized_precision(self.model) if self.model and is_quantized_checkpoint(self.model) else None
            object.__setattr__(self, "precision", own or ("fp16" if target.gpu else "fp32"))
        check_precision(target, self.precision)
        if self.attention not in ATTENTION:
            raise InputError(f"--attention: expected plugin or native, got {self.attention!r}")
        if target.gpu and self.precision not in ("fp16", "bf16", *PRECISION_BITS):
            raise InputError(f"precision {self.precision!r} for {target.name}: TensorRT engines are built in fp16/bf16 "
                             "or with int8/int4 weight-only linears")
        if target.gpu and self.precision in PRECISION_BITS:
            self.weight_only  # checks method and head now, before any stage runs
        if self.max_batch is None:
            object.__setattr__(self, "max_batch", target.max_batch)
        if not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 256:
            raise InputError(f"--max-batch: expected a whole number from 1 to 256, got {self.max_batch!r}")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"block size {self.block_size}: expected {', '.join(map(str, BLOCK_SIZES))}")

    @property
    def weight_only(self) -> WeightOnlyRequest:
        """The GPU targets' quantization request (weight_only.py)."""
        return WeightOnlyRequest(self.precision, self.quant_method, self.head, self.calibration_tokens,
                                 int8_share=self.int8_share)

    @property
    def settings(self) -> dict:
        """The request as the manifest records it (calibration texts by name, not copied in)."""
        settings = dataclasses.asdict(self)
        if self.prune is not None:
            settings["prune"] = {k: v for k, v in settings["prune"].items() if k not in ("calibration", "vocab_corpus")}
        return settings


def plan_stages(config: CompileConfig) -> list[Stage]:
    """The stages for this request, in order; refuses what cannot be done before any of them runs."""
    target = get_target(config.target)
    budget = MemoryBudget(target, config.precision, config.max_kv_tokens, head=config.head,
                          block_size=config.block_size)
    stages: list[Stage] = [LoadStage(config.model, config.allow_pickle, config.chat_format,
                                     budget=None if config.prune else budget)]
    if config.prune is not None:
        teacher = DEFAULT if config.model is None else os.path.abspath(config.model)
        stages.append(PruneStage(config.prune, teacher, budget))
    if config.precision in PRECISION_BITS and not _quantized_input(config, target.gpu):
        stages.append(QuantizeStage(config.precision, config.block_size,
                                    config.weight_only if target.gpu else None))
    stages.append(ExportStage(target, config.precision, config.attention))
    if config.precision in PRECISION_BITS or (not target.gpu and config.precision != "fp32"):
        stages.append(FidelityStage(config.fidelity_tokens))
    if target.gpu and config.engine and not target.builds_on_device:
        builder = choose_builder(target)
        if builder is None:
            raise no_builder_error(target)
        stages.append(EngineStage(target, builder, config.attention, config.max_prefill, config.max_kv_tokens,
                                  config.max_batch))
    stages.append(PackageStage(target, config.precision, config.settings))
    return stages


def _quantized_input(config: CompileConfig, gpu: bool) -> bool:
    if not (config.model and is_quantized_checkpoint(config.model)):
        return False
    own = quantized_precision(config.model)
    layout = quantized_layout(config.model)
    if gpu != (layout == LAYOUT):
        raise InputError(f"{config.model}: quantized for {'GPU targets' if layout == LAYOUT else 'the cpu target'} "
                         f"({layout} weights), not for {config.target}; quantize its source for {config.target}")
    if config.prune is not None:
        raise InputError(f"{config.model}: a quantized checkpoint cannot be pruned; prune the model it was quantized "
                         "from, then quantize")
    if own != config.precision:
        raise InputError(f"{config.model}: quantized to {own}, not {config.precision}; export it with --precision "
                         f"{own}, or quantize its source again")
    return True


def compile_model(config: CompileConfig, *, progress: bool = True) -> Manifest:
    stages = plan_stages(config)
    with staged_folder(config.out, force=config.force) as work:
        job = Job(artifact=work)
        run_stages(job, stages, progress=progress)
        job.drop_scratch()  # the stages' intermediate folders are not part of the artifact
    return job.manifest

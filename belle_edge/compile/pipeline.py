"""``compile()``: the row of passes from a checkpoint to an artifact, each recorded in the manifest.

    cpu:          load ─▶ [prune] ─▶ quantize (int8/int4) ─▶ export (ONNX, ort flavor) ─▶ fidelity ─▶ package
    rtx3090/a100: load ─▶ [prune] ─▶ export (portable fp16 ONNX) ─▶ build (TensorRT engine + plugin) ─▶ package
    orin:         load ─▶ [prune] ─▶ export (portable fp16 ONNX) ─▶ package; the engine is built on the Jetson (jetson/)

The artifact is built in a hidden sibling folder and renamed into place at the end, so a failed or
interrupted compile never leaves a folder that looks complete; an existing output is replaced only with
``force`` and only once the new one is whole.
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .. import __version__
from ..errors import InputError
from ..manifest import FORMAT, VERSION, write_manifest
from ..core.folders import move_into_place
from ..targets import check_memory, check_precision, get_target

@dataclass(frozen=True)
class CompileConfig:
    out: str
    model: str | None = None  # None: the default model
    target: str = "cpu"
    precision: str | None = None  # None: fp32 on cpu, fp16 on a GPU target
    force: bool = False
    chat_format: str = "auto"
    allow_pickle: bool = False
    block_size: int = 32
    fidelity_tokens: int = 512  # held-out tokens for the quantized-vs-fp32 check
    max_kv_tokens: int = 4096  # the KV cache the memory check budgets for
    attention: str = "plugin"  # GPU targets: our plugin layer, or "native" (TensorRT's attention + explicit mask)
    engine: bool = True  # GPU targets: build the engine here (False: later, with `belle-edge build-engine`)
    max_prefill: int = 512  # GPU engines: the prefill profile's longest chunk
    prune: object | None = None  # a belle_edge.prune.prune.PruneRequest: structured pruning right after load

    def __post_init__(self):
        target = get_target(self.target)
        if self.precision is None:
            object.__setattr__(self, "precision", "fp16" if target.gpu else "fp32")
        check_precision(target, self.precision)
        if self.attention not in ("plugin", "native"):
            raise InputError(f"--attention: expected plugin or native, got {self.attention!r}")
        if target.gpu and self.precision not in ("fp16", "bf16"):
            raise InputError(f"precision {self.precision!r} for {target.name}: this version builds TensorRT engines "
                             "in fp16/bf16 only (weight-only int8/int4 engines are not built yet); use fp16")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise InputError(f"block size {self.block_size}: expected 16, 32, 64, 128 or 256")


def compile_model(config: CompileConfig, *, progress: bool = True) -> dict:
    out = os.path.abspath(config.out)
    if os.path.exists(out) and not config.force:
        raise InputError(f"{config.out}: already exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-")
    try:
        manifest = _run_stages(config, work, progress=progress)
        move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def build_artifact_engine(artifact: str, *, flavour: str | None = None) -> dict:
    """Build the engine of a GPU artifact compiled without one (an Orin artifact, on the Jetson itself).

    Torch-free: it needs the artifact, TensorRT and numpy. The new files are written first and the manifest
    last, replaced in one rename, so an interrupted build leaves the artifact as it was.
    """
    from ..manifest import read_manifest
    from .build_engine import ENGINE_FILE, LOG_FILE, build_engine

    manifest = read_manifest(artifact)
    rt = manifest["runtime"]
    if rt.get("backend") != "tensorrt":
        raise InputError(f"{artifact}: a {manifest['target']} artifact runs on {rt.get('backend')}; it has no engine "
                         "to build")
    if rt.get("engine"):
        raise InputError(f"{artifact}: already has {rt['engine']}; compile again to rebuild it")
    t0 = time.perf_counter()
    with _RssSampler() as rss:
        record = build_engine(os.path.join(artifact, rt["onnx"]), artifact, sm=rt["sm"], attention=rt["attention"],
                              max_prefill=rt["max_prefill"], max_past=rt["max_past"], flavour=flavour)
    record.update(name="build", seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(rss.peak / 2**20, 1))
    manifest["stages"].append(record)
    manifest["runtime"].update(engine=ENGINE_FILE, engine_built_on_device=False)
    written = write_manifest(artifact, manifest)  # hashes the new engine and log too; replaced in one rename
    assert ENGINE_FILE in written["files"] and LOG_FILE in written["files"]
    return record


def _run_stages(config: CompileConfig, work: str, *, progress: bool) -> dict:
    from .export_onnx import export_onnx
    from .fidelity import measure_fidelity
    from ..core.load import load_checkpoint
    from .quantize import gguf_blocks, quantize_weights

    from .build_engine import build_engine

    target = get_target(config.target)
    stages = []
    if target.gpu:
        builds_here = config.engine and target.builders != ("tensorrt-on-device",)
        steps = ["load", "export"] + (["build"] if builds_here else []) + ["package"]
    else:
        steps = ["load"] + (["quantize"] if config.precision in ("int8", "int4") else []) + ["export"] + \
            (["fidelity"] if config.precision != "fp32" else []) + ["package"]
    if config.prune is not None:
        steps.insert(1, "prune")
    bar = _progress(len(steps), enabled=progress)

    def fits(ckpt) -> dict:  # the target's memory budget, for the model that will actually ship
        cfg = ckpt.config
        params = int(sum(v.numel() for k, v in ckpt.state_dict.items() if not k.endswith("slopes")))
        return {"parameters": params, "memory": check_memory(
            get_target(config.target), config.precision, params=params, layers=cfg.num_layers,
            kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, kv_tokens=min(config.max_kv_tokens, cfg.max_positions))}

    with _stage("load", stages, bar) as rec:
        ckpt = load_checkpoint(config.model, allow_pickle=config.allow_pickle, chat_format=config.chat_format)
        rec.update(source=ckpt.source, kind=ckpt.kind, family=ckpt.config.family)
        if "prune" not in steps:  # a model too big for the target may still fit once pruned
            rec.update(fits(ckpt))
    if "prune" in steps:
        with _stage("prune", stages, bar) as rec:
            from .prune.prune import prune_checkpoint

            result = prune_checkpoint(ckpt, config.prune, log=lambda line: print(line, file=sys.stderr))
            ckpt = result.checkpoint
            rec.update(result.record)
            rec.update(fits(ckpt))
    if target.gpu and config.attention == "plugin":
        from .trt_plugin import check_plugin_shapes

        check_plugin_shapes(ckpt.config, where=ckpt.source)
    quantized = None
    if "quantize" in steps:
        with _stage("quantize", stages, bar) as rec:
            # a GGUF's own blocks are carried over only while the weights are still the file's
            carried = ckpt.kind == "gguf" and "prune" not in steps
            blocks = gguf_blocks(ckpt.source, ckpt.config) if carried else None
            quantized, record = quantize_weights(ckpt.config, ckpt.state_dict, config.precision,
                                                 block_size=config.block_size, gguf_blocks=blocks)
            rec.update(record)
    with _stage("export", stages, bar) as rec:
        dtype = "float16" if config.precision in ("fp16", "bf16") else "float32"
        # a cpu artifact runs on onnxruntime: let it use its fused ops; TensorRT parses the portable one
        rec.update(export_onnx(ckpt.config, ckpt.state_dict, work, dtype=dtype, quantized=quantized,
                               flavor="portable" if target.gpu else "ort",
                               attention=config.attention if target.gpu else "plugin"))
    engine = None
    if "build" in steps:
        with _stage("build", stages, bar) as rec:
            engine = build_engine(os.path.join(work, "model.onnx"), work, sm=target.sm, attention=config.attention,
                                  max_prefill=config.max_prefill, max_past=min(config.max_kv_tokens,
                                                                                  ckpt.config.max_positions))
            rec.update(engine)
    if "fidelity" in steps:
        with _stage("fidelity", stages, bar) as rec:
            rec.update(measure_fidelity(ckpt, os.path.join(work, "model.onnx"), tokens=config.fidelity_tokens))
    with _stage("package", stages, bar) as rec:
        ckpt.tokenizer.save(os.path.join(work, "tokenizer.json"))
        manifest = {
            "format": FORMAT, "version": VERSION, "belle_edge": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": ckpt.source, "kind": ckpt.kind, "fingerprint": ckpt.fingerprint,
                       "name": _source_name(config.model, ckpt.source)},
            "model": ckpt.config.to_dict(), "target": config.target, "precision": config.precision,
            "settings": _settings(config),
            "runtime": {"backend": "tensorrt" if target.gpu else "onnxruntime", "onnx": "model.onnx",
                        "engine": engine["engine"] if engine else None,
                        "engine_built_on_device": target.gpu and engine is None,
                        "attention": config.attention if target.gpu else "plugin",
                        "max_prefill": config.max_prefill,
                        "max_past": min(config.max_kv_tokens, ckpt.config.max_positions),
                        "sm": target.sm, "kv_dtype": dtype,
                        "max_positions": ckpt.config.max_positions, "stop_token_ids": sorted(ckpt.stop_token_ids),
                        "fingerprint": f"{ckpt.fingerprint}-{config.target}-{config.precision}"},
            "chat_format": ckpt.chat_format.to_dict(),
            "tools": _tool_versions(),
        }
    manifest["stages"] = stages  # the package stage's own record is complete now
    manifest = write_manifest(work, manifest)  # last: a folder with a manifest is a whole artifact
    bar.close()
    return manifest


def _settings(config: CompileConfig) -> dict:
    settings = asdict(config)
    if config.prune is not None:  # the request's calibration texts are recorded by name, not copied in
        settings["prune"] = {k: v for k, v in settings["prune"].items() if k not in ("calibration", "vocab_corpus")}
    return settings


def _source_name(model: str | None, source: str) -> str:
    if model is None:
        from ..default_model import NAME

        return NAME
    return os.path.basename(source.rstrip("/"))


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy", "gguf"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


# ------------------------------------------------------------------------------------------- stage records
class _RssSampler:
    """Peak resident memory of this process while a stage runs (sampled every 20 ms from /proc)."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def _stage(name: str, stages: list, bar):
    record = {"name": name}
    bar.set_description(f"compile: {name}")
    t0 = time.perf_counter()
    with _RssSampler() as rss:
        yield record
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["peak_rss_mb"] = round(rss.peak / 2**20, 1)
    stages.append(record)
    bar.update(1)


def _progress(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="stage", leave=False)

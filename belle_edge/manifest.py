"""The artifact's ``manifest.json``: what a compiled artifact is, how it was made, and its files.

The schema is the frozen dataclasses below, nothing else: :class:`Manifest` and what it holds. Reading
validates every field against them (an unknown format version, a missing field, an unknown field or a
wrong type is an :class:`ArtifactError` naming the field), so the runtime reads typed attributes, never
string keys. Each fact is stated once:

* what runs and how: :class:`Runtime` (backend, ONNX file, KV dtype, stop tokens), and the engine's own
  facts — builder and release, compute capability, profiles, plugin identity — only in :class:`Engine`;
* how it was made: one :class:`StageRecord` per stage that ran, in order (``details`` holds the figures
  each stage documents in its own module: the prune plan, the quantization plan, fidelity, ...);
* what the user asked for: ``settings`` (the compile request, as given);
* the files: :class:`FileRecord` (bytes, sha256) per file; the manifest is written last, so a folder
  without one is never a complete artifact.

Version 2 (belle_edge 0.2): typed sections, the engine in ``runtime.engine``. Version 1 artifacts are
refused with the command to recompile.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field

from .errors import BelleEdgeError, CheckpointError, first_line
from .models.config import ModelConfig

FORMAT = "belle_edge.artifact"
VERSION = 2
MANIFEST = "manifest.json"


class ArtifactError(CheckpointError):
    """An artifact folder is incomplete, damaged, or of another format version."""


# --------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Source:
    path: str  # the checkpoint compiled (absolute path)
    kind: str  # "hf" | "gguf" | "quantized"
    fingerprint: str  # config + tokenizer hash (core.checkpoint.Checkpoint.fingerprint)
    name: str  # for people: the default model's name, or the checkpoint's folder/file name


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: [min, max] of each dynamic dimension."""
    name: str  # "prefill" | "decode" | "prefill+decode"
    batch: tuple[int, int]
    new_tokens: tuple[int, int]
    past: tuple[int, int]


@dataclass(frozen=True)
class Plugin:
    """Identity of our TensorRT plugin in the engine (the C++ library must serve exactly this)."""
    name: str
    version: str
    namespace: str
    layers: int  # plugin layers in the engine
    in_engine: bool  # the identity was found in the serialized engine


@dataclass(frozen=True)
class Engine:
    file: str  # "model.engine"
    log: str  # the builder's log, "build.log"
    builder: str  # Python module that built it: "tensorrt" | "tensorrt_rtx"
    builder_version: str  # an engine runs only on the release that built it
    sm: int  # compute capability it was built for (86 = sm_86)
    attention: str  # "plugin" | "native"
    profiles: tuple[Profile, ...]
    plugin: Plugin | None  # None: no plugin layers
    bytes: int

    @property
    def max_past(self) -> int:
        return min(p.past[1] for p in self.profiles)

    @property
    def max_new_tokens(self) -> int:
        return max(p.new_tokens[1] for p in self.profiles)


@dataclass(frozen=True)
class Runtime:
    backend: str  # what runs it by design: "onnxruntime" (cpu) | "tensorrt" (GPU targets)
    onnx: str  # "model.onnx" (+ "model.onnx.data"): every artifact has one, the fallback of GPU artifacts
    attention: str  # how the ONNX expresses attention: "plugin" (our node) | "native" (ONNX Attention)
    kv_dtype: str  # "float32" | "float16"
    max_positions: int
    stop_token_ids: tuple[int, ...]
    fingerprint: str  # identifies model + target + precision, so a saved session is not restored elsewhere
    engine: Engine | None = None  # the TensorRT engine, once built
    engine_on_device: bool = False  # the engine is built on the device itself (an Orin artifact: jetson/)
    mask_rule: int = 1  # mask.RULE_VERSION of the rule the ONNX traced (absent: written before pinned notes)


@dataclass(frozen=True)
class StageRecord:
    name: str
    seconds: float
    peak_rss_mb: float  # this process's peak resident memory while the stage ran
    reads: str = ""  # what it read (a path, or a file of the artifact)
    writes: tuple[str, ...] = ()  # what it wrote (files of the artifact, or a folder)
    details: dict = field(default_factory=dict)  # the stage's own figures (see the stage's module)


@dataclass(frozen=True)
class Manifest:
    format: str
    version: int
    belle_edge: str  # package version that wrote it
    created: str  # ISO-8601 UTC
    source: Source
    model: ModelConfig  # the model the artifact holds (after pruning)
    target: str  # belle_edge.targets name, e.g. "rtx3090"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8" | "int4"
    settings: dict  # the compile request as given (CompileConfig)
    runtime: Runtime
    chat_format: dict  # runtime.chat_format's dict
    tools: dict[str, str]  # versions of the libraries that built it
    stages: tuple[StageRecord, ...]
    files: dict[str, FileRecord] = field(default_factory=dict)  # filled by write_manifest

    def stage(self, name: str) -> StageRecord:
        """The record of the last stage called ``name``."""
        for record in reversed(self.stages):
            if record.name == name:
                return record
        raise KeyError(f"no {name!r} stage in this artifact's manifest (stages: {[s.name for s in self.stages]})")

    def has_stage(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, data: dict, *, where: str = MANIFEST) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ArtifactError(f"{where}: format is {found!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            # repr: a version is a number, anything else is shown as what it is, on one line (fuzzing found "\n")
            raise ArtifactError(f"{where}: artifact version {data.get('version')!r:.40}, this belle_edge reads {VERSION}; "
                                "recompile with this version (belle-edge compile ... --force)")
        return _from_json(cls, data, where, "")


# --------------------------------------------------------------------------------------------- files
def is_artifact(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def file_record(path: str) -> FileRecord:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return FileRecord(bytes=os.path.getsize(path), sha256=digest.hexdigest())


def write_manifest(folder: str, manifest: Manifest) -> Manifest:
    """Write ``manifest`` with the folder's files listed and hashed; returns what was written."""
    files = {name: file_record(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
             if name != MANIFEST and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))}
    manifest = manifest.replace(files=files)
    tmp = os.path.join(folder, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power cut leaves the old manifest or the new one
    os.replace(tmp, os.path.join(folder, MANIFEST))  # an existing manifest is replaced whole or not at all
    return manifest


def read_manifest(folder: str, *, verify_hashes: bool = False) -> Manifest:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: not an artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, a 5000-digit number
        raise ArtifactError(f"{path}: not readable JSON ({first_line(e)})") from None
    except RecursionError:  # JSON nested thousands deep (fuzzing)
        raise ArtifactError(f"{path}: not readable JSON (nested too deeply)") from None
    manifest = Manifest.from_dict(data, where=path)
    for field_name, name in _named_files(manifest):
        artifact_file(folder, name, field_name)
    for name, record in manifest.files.items():
        file = artifact_file(folder, name, f"files.{name}")
        if not os.path.isfile(file):
            raise ArtifactError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if os.path.getsize(file) != record.bytes:
            raise ArtifactError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {record.bytes}")
        if verify_hashes and file_record(file).sha256 != record.sha256:
            raise ArtifactError(f"{file}: sha256 differs from the manifest")
    return manifest


def artifact_file(folder: str, name: str, field_name: str) -> str:
    """``folder/name``, refused unless ``name`` is a plain relative name that stays inside ``folder`` (no
    absolute path, no ``..``, no symlink out): an artifact copied from elsewhere must not make the runtime
    open, hash or load files outside it."""
    parts = name.replace("\\", "/").split("/")
    control = any(ord(c) < 32 for c in name)  # a NUL made os.path raise ValueError (fuzzing); none is a file name
    if not name or control or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or "" in parts:
        raise ArtifactError(f"{os.path.join(folder, MANIFEST)}: field {field_name}: {name!r} is not a file name "
                            "inside the artifact folder")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ArtifactError(f"{path}: field {field_name} leads outside the artifact folder (a link to "
                            f"{os.path.realpath(path)})")
    return path


def _named_files(manifest: "Manifest"):
    """(field, file name) of every file the runtime opens by a name the manifest gives."""
    yield "runtime.onnx", manifest.runtime.onnx
    engine = manifest.runtime.engine
    if engine is not None:
        yield "runtime.engine.file", engine.file
        yield "runtime.engine.log", engine.log


# --------------------------------------------------------------------------------------------- (de)serialising
def _to_json(value):
    if isinstance(value, ModelConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(cls, data, where: str, path: str):
    """An instance of dataclass ``cls`` from JSON ``data``, every field checked against its annotation."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: field {path or 'manifest'}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ArtifactError(f"{where}: unknown field {_join(path, unknown[0])} (this belle_edge reads version {VERSION})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{where}: field {_join(path, name)} is missing")
            continue
        values[name] = _value(hints[name], data[name], where, _join(path, name))
    return cls(**values)


def _value(hint, value, where: str, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where, path)
    if hint is ModelConfig:
        try:
            return ModelConfig.from_dict(value) if isinstance(value, dict) else _wrong(hint, value, where, path)
        except (BelleEdgeError, TypeError) as e:
            raise ArtifactError(f"{where}: field {path}: {e}") from None
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value, where, path)
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            _wrong(hint, value, where, path)
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_value(k, v, where, f"{path}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            _wrong(hint, value, where, path)
        return {k: _value(args[1], v, where, _join(path, k)) for k, v in value.items()} if args else dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    _wrong(hint, value, where, path)


def _wrong(hint, value, where: str, path: str):
    expected = getattr(hint, "__name__", str(hint))
    raise ArtifactError(f"{where}: field {path}: expected {expected}, got {type(value).__name__} {value!r:.40}")


def _join(path: str, name: str) -> str:
    """A field's path for a message; a key from the file that is not plain printable text (a line break, a NUL:
    fuzzing) is shown as its repr, so the message stays one line."""
    if not (name.isprintable() and name and len(name) <= 80):
        name = f"{name!r:.80}"
    return f"{path}.{name}" if path else name

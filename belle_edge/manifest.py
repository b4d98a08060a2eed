"""The artifact's ``manifest.json``: what a compiled artifact is, how it was made, and its files.

Schema (version 1)::

    format            "belle_edge.artifact"
    version           1
    belle_edge        package version that wrote it
    created           ISO-8601 UTC time
    source            {"path", "kind": "hf"|"gguf", "fingerprint"}
    model             ModelConfig as a dict (belle_edge/models/config.py)
    target, precision e.g. "cpu", "int4"
    runtime           {"backend": "onnxruntime", "onnx", "kv_dtype", "max_positions", "stop_token_ids",
                       "fingerprint"}
    chat_format       the chat format's dict (runtime/chat_format.py)
    tools             versions of the libraries that built it
    stages            [{"name", "seconds", "peak_rss_mb", ...stage fields}] in the order they ran
    files             {relative path: {"bytes", "sha256"}}

The manifest is written last, so a folder without one is never a complete artifact.
"""
from __future__ import annotations

import hashlib
import json
import os

from .errors import CheckpointError

FORMAT = "belle_edge.artifact"
VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(CheckpointError):
    """An artifact folder is incomplete, damaged, or of another format version."""


def is_artifact(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def file_record(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def write_manifest(folder: str, manifest: dict) -> dict:
    """Write ``manifest`` with the file list added; returns what was written."""
    manifest = dict(manifest)
    manifest["files"] = {name: file_record(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
                         if name != MANIFEST and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))}
    tmp = os.path.join(folder, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(folder, MANIFEST))  # an existing manifest is replaced whole or not at all
    return manifest


def read_manifest(folder: str, *, verify_hashes: bool = False) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: not an artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact version {manifest.get('version')}, this belle_edge reads {VERSION}; "
                            "recompile with this version")
    for name, record in manifest.get("files", {}).items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ArtifactError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if os.path.getsize(file) != record["bytes"]:
            raise ArtifactError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {record['bytes']}")
        if verify_hashes and file_record(file)["sha256"] != record["sha256"]:
            raise ArtifactError(f"{file}: sha256 differs from the manifest")
    return manifest

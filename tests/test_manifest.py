"""The typed manifest: what compile writes reads back as the same Manifest, and a damaged or foreign one is
refused with one line naming the field."""
import copy
import json
import os
import subprocess
import sys

import pytest

from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.manifest import MANIFEST, ArtifactError, Manifest, read_manifest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_llama_dir):
    out = str(tmp_path_factory.mktemp("manifest") / "art")
    written = compile_model(CompileConfig(out=out, model=tiny_llama_dir, precision="fp16", fidelity_tokens=32),
                            progress=False)
    with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
        return out, written, json.load(f)


def test_what_compile_writes_round_trips(compiled):
    out, written, raw = compiled
    again = read_manifest(out, verify_hashes=True)
    assert again == written  # typed, field for field: what compile returned is what a reader gets
    assert again.to_dict() == raw  # and the JSON is exactly the schema's
    assert again.runtime.kv_dtype == "float16" and again.runtime.engine is None and again.model.num_layers == 2
    assert [s.name for s in again.stages] == ["load", "export", "fidelity", "package"]
    assert again.stage("fidelity").details["tokens"] == 32 and again.source.kind == "hf"


def _refused(tmp_path, raw, edit):
    doc = copy.deepcopy(raw)
    edit(doc)
    folder = tmp_path / "art"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ArtifactError) as e:
        read_manifest(str(folder))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_manifest_rejects_an_unknown_version(compiled, tmp_path):
    message = _refused(tmp_path, compiled[2], lambda d: d.update(version=1))
    assert "artifact version 1, this belle_edge reads 2; recompile" in message


def test_manifest_rejects_a_missing_field(compiled, tmp_path):
    message = _refused(tmp_path, compiled[2], lambda d: d["runtime"].pop("kv_dtype"))
    assert "field runtime.kv_dtype is missing" in message


def test_manifest_rejects_a_wrong_type(compiled, tmp_path):
    message = _refused(tmp_path, compiled[2], lambda d: d["runtime"].update(max_positions="512"))
    assert "field runtime.max_positions: expected int, got str" in message
    message = _refused(tmp_path, compiled[2], lambda d: d["stages"][0].update(seconds="fast"))
    assert "field stages[0].seconds: expected float" in message
    message = _refused(tmp_path, compiled[2], lambda d: d["files"]["model.onnx"].update(bytes=None))
    assert "field files.model.onnx.bytes: expected int, got NoneType" in message


def test_manifest_rejects_an_unknown_field_and_a_bad_model(compiled, tmp_path):
    assert "unknown field runtime.engine_built_on_device" in _refused(
        tmp_path, compiled[2], lambda d: d["runtime"].update(engine_built_on_device=True))
    assert "field model:" in _refused(tmp_path, compiled[2], lambda d: d["model"].update(num_layers=0))


def test_inspect_refuses_a_damaged_manifest_in_one_line(compiled, tmp_path):
    doc = copy.deepcopy(compiled[2])
    doc["runtime"].pop("onnx")
    (tmp_path / MANIFEST).write_text(json.dumps(doc), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "belle_edge.cli", "inspect", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "field runtime.onnx is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_manifest_from_a_dict_is_the_schema_not_a_guess():
    with pytest.raises(ArtifactError, match="format is 'something.else'"):
        Manifest.from_dict({"format": "something.else", "version": 2})

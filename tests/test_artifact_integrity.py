"""What an artifact folder may claim: every name in its manifest stays inside the folder, sizes are checked
on every load and hashes on request; and the folder helpers that make writes whole (core/folders.py)."""
import json
import os
import shutil

import pytest

from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.core.folders import move_into_place, remove_abandoned, staged_folder
from belle_edge.manifest import ArtifactError, read_manifest


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama_dir):
    out = str(tmp_path_factory.mktemp("integrity") / "art")
    compile_model(CompileConfig(out=out, model=tiny_llama_dir), progress=False)
    return out


def _edited(artifact, tmp_path, edit) -> str:
    copy = str(tmp_path / "copy")
    shutil.copytree(artifact, copy)
    path = os.path.join(copy, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return copy


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/../../x", "", "a//b"])
def test_a_file_name_leading_out_of_the_artifact_is_refused(artifact, tmp_path, name):
    (tmp_path / "outside.txt").write_text("x")
    copy = _edited(artifact, tmp_path, lambda d: d["files"].__setitem__(name, {"bytes": 1, "sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="inside the artifact folder"):
        read_manifest(copy)


@pytest.mark.parametrize("field", ["onnx", "engine"])
def test_the_runtime_files_must_be_inside_too(artifact, tmp_path, field):
    def edit(d):
        if field == "onnx":
            d["runtime"]["onnx"] = "../../model.onnx"
        else:
            d["runtime"]["engine"] = {"file": "/tmp/x.engine", "log": "build.log", "builder": "tensorrt_rtx",
                                      "builder_version": "1", "sm": 86, "attention": "plugin", "profiles": [],
                                      "plugin": None, "bytes": 1}
    with pytest.raises(ArtifactError, match=r"runtime\.(onnx|engine\.file)"):
        read_manifest(_edited(artifact, tmp_path, edit))


def test_a_link_out_of_the_folder_is_refused(artifact, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(artifact, copy)
    outside = tmp_path / "elsewhere.json"
    shutil.copy(os.path.join(copy, "tokenizer.json"), outside)
    os.remove(os.path.join(copy, "tokenizer.json"))
    os.symlink(outside, os.path.join(copy, "tokenizer.json"))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        read_manifest(copy)


def test_sizes_are_checked_on_every_load_and_hashes_on_request(artifact, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(artifact, copy)
    with open(os.path.join(copy, "tokenizer.json"), "r+b") as f:  # same size, one byte changed
        first = f.read(1)
        f.seek(0)
        f.write(b"[" if first != b"[" else b"{")
    read_manifest(copy)  # the cheap check passes: same size
    with pytest.raises(ArtifactError, match="sha256"):
        read_manifest(copy, verify_hashes=True)
    with open(os.path.join(copy, "tokenizer.json"), "ab") as f:
        f.write(b" ")
    with pytest.raises(ArtifactError, match="bytes, the manifest says"):
        read_manifest(copy)


def test_a_forced_replacement_swaps_the_folders_whole(tmp_path):
    out = str(tmp_path / "out")
    with staged_folder(out) as work:
        open(os.path.join(work, "old"), "w").close()
    with staged_folder(out, force=True) as work:
        open(os.path.join(work, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["out"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "third").touch()
    move_into_place(str(other), out)
    assert os.listdir(out) == ["third"] and os.listdir(tmp_path) == ["out"]


def test_work_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    out = str(tmp_path / "art")
    dead, old, live = (tmp_path / ".art.partial-999999999-x", tmp_path / ".art.old-999999999",
                       tmp_path / f".art.partial-{os.getpid()}-y")
    for folder in (dead, old, live):
        folder.mkdir()
    assert sorted(remove_abandoned(out)) == sorted([str(dead), str(old)])
    assert live.exists() and not dead.exists() and not old.exists()


def test_a_staged_folder_is_flushed_to_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """fsync of each file and folder before the rename publishes the folder, and of the parent after: the
    whole-or-nothing rule then holds after a power cut too, not only after a killed process."""
    import belle_edge.core.folders as folders

    synced = []
    real = os.fsync
    monkeypatch.setattr(folders.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    out = tmp_path / "out"
    with staged_folder(str(out)) as work:
        os.makedirs(os.path.join(work, "sub"))
        for name in ("a.bin", "sub/b.bin"):
            with open(os.path.join(work, name), "wb") as f:
                f.write(b"x" * 10)
    assert out.is_dir() and synced[-1] == str(tmp_path)  # the parent, after the rename
    names = {os.path.basename(p) for p in synced}
    assert {"a.bin", "b.bin", "sub"} <= names and os.path.basename(work) in names  # the tree, before it

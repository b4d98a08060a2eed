"""Building kernels/ with nvcc: the shared library the torch op loads, and the per-architecture compile check.

The TensorRT plugin and Jetson builds use CMake (kernels/CMakeLists.txt); this module is the no-CMake path
for Python: one nvcc call, cached by a hash of the sources, the flags and the architectures, so an edited
kernel is rebuilt and an unchanged one is not.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess

from ..errors import BelleEdgeError, MissingDependencyError
from ..paths import cache_or_temp_dir, kernels_dir

LIBRARY = "libbelle_attention.so"
HOT_KERNELS = ("prefill_kernel", "decode_kernel", "weight_only_kernel", "add_rms_norm_kernel")  # no spills (ptxas -v)
CI_ARCHS = (80, 86, 87, 90)  # A100, RTX 3090, Orin, H100
FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v")


class KernelBuildError(BelleEdgeError):
    """nvcc failed; the message names the log."""


def declare(lib, signatures: dict) -> None:
    """Give the C functions of ``lib`` their ctypes signatures: {name: (argtypes, restype)}."""
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype


def sources(root: str | None = None) -> list[str]:
    root = root or kernels_dir()
    return sorted(glob.glob(os.path.join(root, "src", "*.cu")))


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        raise MissingDependencyError("nvcc not found: install the CUDA toolkit (or put it on PATH)")
    return nvcc


def _gencode(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def build_library(archs, *, cache_dir: str | None = None) -> str:
    """Compile kernels/src into one shared library for ``archs`` (e.g. (90,)); returns its path (cached)."""
    root = kernels_dir()
    srcs = sources(root)
    digest = hashlib.sha256()
    for path in srcs + sorted(glob.glob(os.path.join(root, "src", "*.cuh")) + glob.glob(os.path.join(root, "src", "*.h"))
                               + glob.glob(os.path.join(root, "include", "*.h"))):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    digest.update(repr((FLAGS, tuple(archs))).encode())
    cache_dir = cache_dir or cache_or_temp_dir("kernels", digest.hexdigest()[:16])  # BELLE_EDGE_CACHE=off: a temp dir
    lib = os.path.join(cache_dir, LIBRARY)
    if os.path.exists(lib):
        return lib
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{lib}.tmp-{os.getpid()}"
    log = os.path.join(cache_dir, "build.log")
    cmd = [_nvcc(), *FLAGS, "-shared", "-I", os.path.join(root, "include"), *_gencode(archs), *srcs, "-o", tmp]
    _run(cmd, log)
    os.replace(tmp, lib)  # whole or absent
    return lib


def compile_check(archs=CI_ARCHS, *, out_dir: str) -> dict:
    """Compile every kernel source for each arch (objects only) with ``-Xptxas -v``; the log goes to
    ``out_dir/ptxas.log``. Returns {"log", "kernels": [{"arch", "name", "registers", "spill_bytes",
    "stack_bytes"}]}."""
    root = kernels_dir()
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "ptxas.log")
    open(log, "w").close()
    for src in sources(root):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        _run([_nvcc(), *FLAGS, "--threads", "0", "-c", "-I", os.path.join(root, "include"), *_gencode(archs), src, "-o", obj], log,
             append=True)
    with open(log) as f:
        return {"log": log, "kernels": parse_ptxas(f.read())}


def parse_ptxas(text: str) -> list[dict]:
    """Registers, spills and stack per (kernel, arch) from ``ptxas -v`` output."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            current = {"name": m.group(1), "arch": int(m.group(2)), "spill_bytes": 0, "stack_bytes": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack_bytes"] = int(m.group(1))
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return rows


def _run(cmd: list[str], log: str, *, append: bool = False) -> None:
    with open(log, "a" if append else "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log) as f:
            errors = [line.strip() for line in f if "error" in line]
        raise KernelBuildError(f"nvcc failed: {errors[0] if errors else 'see the log'} (log: {log})")

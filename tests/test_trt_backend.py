"""The TensorRT runtime backend.

Everywhere: the engine check against the machine (TensorRT flavour and release, SM) on the manifests of real
TensorRT-RTX engine builds, the plugin-library refusals, CUDA's availability reason, the fallback to ONNX
Runtime with its one line on stderr, and that none of it imports torch. Where CUDA works (``-m gpu``): the KV
cache's device copies (ping-pong, 2D compaction, read/write) against numpy; and where TensorRT can also run
the engine, a dialogue through :class:`TrtBackend` against ONNX Runtime's logits. Without them those tests
skip with the reason.
"""
import dataclasses
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from belle_edge.errors import BelleEdgeError, InputError, MissingDependencyError
from belle_edge.mask import MaskConfig
from belle_edge.runtime.backends import cuda_device
from belle_edge.manifest import Plugin
from belle_edge.runtime.backends.trt_backend import (PLUGIN_ENV, EngineMismatchError, EngineRuntimeError,
                                                     TrtBackend, check_engine, load_plugin, plugin_library)

HAS_GPU_NODE = bool(glob.glob("/dev/nvidia[0-9]*"))
HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and \
    importlib.util.find_spec("cuda.bindings") is not None
SM_TARGETS = {86: "rtx3090"}  # targets whose engines TensorRT-RTX builds (and whose GPUs run them)
LIBM = ("/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6")


def _device_sm() -> int | None:
    if cuda_device.unavailable():
        return None
    device = cuda_device.open_device()
    try:
        return device.compute_capability()
    finally:
        device.close()


@pytest.fixture(scope="session")  # session: set up (or skipped) before the session-scoped checkpoint fixtures
def trt_rtx():
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'belle_edge[trt]')")


@pytest.fixture(scope="module")
def artifact(trt_rtx, tmp_path_factory, tiny_llama_dir):
    """A real engine (TensorRT-RTX, no GPU needed to build) of the tiny GQA LLaMA with TensorRT's native
    attention (no plugin library needed to run it), for this GPU's SM where a target has it, else sm_86.
    Short prefill chunks (32) so a prompt spans several calls."""
    from belle_edge.compile.pipeline import CompileConfig, compile_model

    out = str(tmp_path_factory.mktemp("trt") / "art")
    target = SM_TARGETS.get(_device_sm(), "rtx3090")
    manifest = compile_model(CompileConfig(out=out, model=tiny_llama_dir, target=target, precision="fp16",
                                           attention="native", max_kv_tokens=256, max_prefill=32), progress=False)
    return out, manifest


def _with_engine(manifest, **changes):
    engine = dataclasses.replace(manifest.runtime.engine, **changes)
    return manifest.replace(runtime=dataclasses.replace(manifest.runtime, engine=engine))


# ------------------------------------------------------------------------------------------- check_engine
def test_check_engine_accepts_the_machine_the_engine_was_built_for(artifact, trt_rtx):
    path, manifest = artifact
    engine = check_engine(manifest, trt_rtx, manifest.runtime.engine.sm, artifact=path)
    assert engine.builder == "tensorrt_rtx" and engine.builder_version == trt_rtx.__version__
    assert engine.plugin is None and os.path.isfile(os.path.join(path, engine.file))


def test_check_engine_refuses_another_gpu_with_the_rebuild_command(artifact, trt_rtx):
    path, manifest = artifact[0], _with_engine(artifact[1], sm=86)
    model = manifest.settings["model"]
    with pytest.raises(EngineMismatchError) as e:
        check_engine(manifest, trt_rtx, 80, artifact=path)
    message = str(e.value)
    assert "\n" not in message and "built for sm_86" in message and "this GPU is sm_80 (a100 / a100-40)" in message
    assert message.endswith(f"belle-edge compile {model} --target a100 --precision fp16 --attention native "
                            f"--max-kv-tokens 256 --out {path} --force"), message
    # an Orin: its engine is built on the device itself, from an artifact exported without one
    with pytest.raises(EngineMismatchError, match=r"this GPU is sm_87 \(orin-agx / orin-nx / orin-nano\); rebuild "
                       r"it: on the host: belle-edge compile .* --target orin-agx .*--no-engine --out .* --force; "
                       r"then on this device: belle-edge build-engine "):
        check_engine(manifest, trt_rtx, 87, artifact=path)
    with pytest.raises(EngineMismatchError, match="this GPU is sm_89, for which belle-edge has no target"):
        check_engine(manifest, trt_rtx, 89, artifact=path)


@pytest.mark.parametrize("flavour,version,expected", [
    ("tensorrt_rtx", "1.6.0.29", "built with TensorRT-RTX 1.6.0.29, but this machine has TensorRT-RTX {v}"),
    ("tensorrt", "10.3.0.30", "built with TensorRT 10.3.0.30, but this machine has TensorRT-RTX {v}"),
])
def test_check_engine_refuses_another_tensorrt(artifact, trt_rtx, flavour, version, expected):
    path, real = artifact
    manifest = _with_engine(real, builder=flavour, builder_version=version)
    with pytest.raises(EngineMismatchError) as e:
        check_engine(manifest, trt_rtx, real.runtime.engine.sm, artifact=path)
    message = str(e.value)
    assert "\n" not in message and expected.format(v=trt_rtx.__version__) in message, message
    assert f"rebuild it here: belle-edge compile {real.settings['model']} --target {real.target} " in message
    assert isinstance(e.value, InputError)  # a user's fixable mistake: the CLI prints one line


def test_an_artifact_without_an_engine_is_refused_for_tensorrt(artifact):
    from belle_edge.runtime.artifact import _tensorrt

    path, real = artifact
    manifest = real.replace(runtime=dataclasses.replace(real.runtime, engine=None, engine_on_device=True))
    with pytest.raises(InputError, match=f"no TensorRT engine \\(build it: belle-edge build-engine {re.escape(path)}"):
        _tensorrt(path, manifest)


# ------------------------------------------------------------------------------------------- plugin library
def test_plugin_engines_need_the_plugin_library(artifact, trt_rtx, monkeypatch, tmp_path):
    path, real = artifact
    assert plugin_library(real, path) is None  # native attention: no plugin layers, nothing to load
    identity = Plugin(name="DynamicMaskAttention", version="1", namespace="belle", layers=2, in_engine=True)
    manifest = _with_engine(real, plugin=identity)
    monkeypatch.setenv(PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(MissingDependencyError) as e:
        plugin_library(manifest, path)
    assert "\n" not in str(e.value) and "2 belle::DynamicMaskAttention plugin layers" in str(e.value)
    assert "missing.so" in str(e.value) and "--attention native" in str(e.value)
    # a shared library that is not a TensorRT plugin library: TensorRT refuses it, and so do we, in one line
    libm = next(p for p in LIBM if os.path.exists(p))
    monkeypatch.setenv(PLUGIN_ENV, libm)
    assert plugin_library(manifest, path) == libm
    with pytest.raises(EngineRuntimeError, match="could not load it as a plugin library"):
        load_plugin(trt_rtx, libm, identity)


def test_the_plugin_library_is_looked_for_in_this_checkouts_kernels_build(artifact, monkeypatch, tmp_path):
    """Without $BELLE_EDGE_PLUGIN or a library in the artifact, the fallback is kernels/build of the checkout
    belle_edge runs from (it once resolved to the checkout's parent), or of $BELLE_EDGE_KERNELS."""
    path, real = artifact
    manifest = _with_engine(real, plugin=Plugin(name="DynamicMaskAttention", version="1", namespace="belle",
                                                layers=2, in_engine=True))
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    monkeypatch.delenv("BELLE_EDGE_KERNELS", raising=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    expected = os.path.join(repo, "kernels", "build", "libbelle_trt_plugin.so")
    if os.path.isfile(expected):
        assert plugin_library(manifest, path) == expected
    else:
        with pytest.raises(MissingDependencyError) as e:
            plugin_library(manifest, path)
        assert f"or {expected});" in str(e.value)
    kernels = tmp_path / "kernels"
    (kernels / "include").mkdir(parents=True)
    (kernels / "include" / "belle_attention.h").write_text("")
    (kernels / "build").mkdir()
    (kernels / "build" / "libbelle_trt_plugin.so").write_bytes(b"")
    monkeypatch.setenv("BELLE_EDGE_KERNELS", str(kernels))
    assert plugin_library(manifest, path) == str(kernels / "build" / "libbelle_trt_plugin.so")


# ------------------------------------------------------------------------------------------- CUDA and fallback
def test_cuda_availability_gives_a_device_or_a_one_line_reason():
    reason = cuda_device.unavailable()
    print(f"CUDA here: {reason or 'available'}")
    if reason is None:
        device = cuda_device.open_device()
        assert 50 <= device.compute_capability() < 200 and device.device_name()
        device.close()
        return
    assert "\n" not in reason
    if not HAS_CUDA_PYTHON:
        assert "no CUDA Python bindings" in reason
    elif not HAS_GPU_NODE:  # cuda-python with no driver or GPU (this project's CI machines)
        assert re.search(r"cudaErrorInsufficientDriver|cudaErrorNoDevice", reason), reason


def test_load_artifact_uses_tensorrt_or_says_why_not(artifact, capfd):
    from belle_edge.runtime.artifact import load_artifact

    path, manifest = artifact
    with pytest.raises(InputError, match="backend 'cuda'"):
        load_artifact(path, backend="cuda")
    model = load_artifact(path)
    err = capfd.readouterr().err
    reason = cuda_device.unavailable()
    if reason is None and _device_sm() == manifest.runtime.engine.sm:
        assert model.backend_name == "tensorrt" and err == ""
        assert model.default_capacity == 257  # the engine's KV range bounds the session's default
    else:
        assert model.backend_name == "onnxruntime"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"belle-edge: {path} runs on ONNX Runtime (CPU)"), err
        if reason:
            assert reason in lines[0]
            with pytest.raises(BelleEdgeError, match=re.escape(reason)):
                load_artifact(path, backend="tensorrt")  # refuses rather than falls back
    reply = model.session(max_new_tokens=4).send("你好")
    assert reply.stats.new_tokens >= 1
    assert load_artifact(path, backend="onnxruntime").backend_name == "onnxruntime"
    assert capfd.readouterr().err == ""  # asked for ONNX Runtime: nothing to explain


NO_TORCH = textwrap.dedent('''
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    import json

    import tensorrt_rtx
    from belle_edge.manifest import read_manifest
    from belle_edge.runtime.artifact import load_artifact
    from belle_edge.runtime.backends import cuda_device, trt_backend

    path = sys.argv[1]
    manifest = read_manifest(path)
    trt_backend.check_engine(manifest, tensorrt_rtx, manifest.runtime.engine.sm, artifact=path)
    reason = cuda_device.unavailable()
    model = load_artifact(path)
    reply = model.session(max_new_tokens=3).send("你好")
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    print(json.dumps({"backend": model.backend_name, "reason": reason, "tokens": reply.stats.new_tokens}))
''')


def test_the_tensorrt_path_imports_no_torch(artifact):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, artifact[0]], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tokens"] >= 1 and out["backend"] in ("tensorrt", "onnxruntime")
    if out["reason"]:  # no usable CUDA: the fallback said why
        assert out["backend"] == "onnxruntime" and out["reason"] in result.stderr


# ------------------------------------------------------------------------------------------- on a GPU
class _KvOnlyEngine:
    """What TrtBackend's KV cache uses of an engine (device, stream, lock, shapes): the device copies can be
    checked on any CUDA GPU, TensorRT or not."""

    def __init__(self, cuda, *, layers, kv_heads, head_dim, max_past):
        self.cuda, self.stream, self.lock = cuda, cuda.stream(), threading.Lock()
        self.layers, self.kv_heads, self.head_dim, self.max_past = layers, kv_heads, head_dim, max_past
        self.kv_dtype, self.vocab_size, self.max_new = np.dtype(np.float16), 8, 4


@pytest.mark.gpu
def test_kv_cache_device_copies_match_numpy():
    reason = cuda_device.unavailable()
    if reason:
        pytest.skip(reason)
    cuda = cuda_device.open_device()
    print(f"{cuda.name} on {cuda.device_name()} (sm_{cuda.compute_capability()})")
    # the primitives: pinned host <-> device, device -> device, 2D
    host = cuda.pinned((64,), np.float32)
    host[:] = np.arange(64)
    a, b = cuda.malloc(256), cuda.malloc(256)
    stream = cuda.stream()
    cuda.htod(a, host, stream)
    cuda.memset(b, 0, 256, stream)
    cuda.copy2d(b, 32, a + 8, 64, 16, 4, stream)  # 4 rows of 16 bytes, from pitch 64 to pitch 32
    back = np.empty(64, np.float32)
    cuda.dtoh(back, b, stream)
    cuda.sync(stream)
    expected = np.zeros(64, np.float32)
    for row in range(4):
        expected[8 * row:8 * row + 4] = np.arange(64)[16 * row + 2:16 * row + 6]
    np.testing.assert_array_equal(back, expected)
    cuda.dtod(b, a, 256, stream)
    cuda.dtoh(back, b, stream)
    cuda.sync(stream)
    np.testing.assert_array_equal(back, np.arange(64))
    cuda.free(a)
    cuda.free(b)

    engine = _KvOnlyEngine(cuda, layers=3, kv_heads=2, head_dim=8, max_past=63)
    backend = TrtBackend(engine, capacity=40)
    with pytest.raises(InputError, match="holds at most 64 KV tokens"):
        TrtBackend(engine, capacity=65)
    kv = np.random.default_rng(0).standard_normal((3, 2, 2, 30, 8)).astype(np.float16)
    backend.write_kv(kv, np.arange(30), np.zeros(30, np.int64))
    np.testing.assert_array_equal(backend.read_kv(), kv.astype(np.float32))
    slots = np.array([0, 1, 2, 3, 11, 12, 13, 20, 25, 26, 27, 28, 29])  # 4 runs: 4 x 2D copies per (layer, kind)
    backend.keep(slots)
    assert backend.n == len(slots) and (backend.keys.positions == slots).all()
    np.testing.assert_array_equal(backend.read_kv(), kv[:, :, :, slots].astype(np.float32))
    backend.truncate(5)  # a rollback
    assert backend.n == 5 and (backend.keys.positions == slots[:5]).all()
    np.testing.assert_array_equal(backend.read_kv(), kv[:, :, :, slots[:5]].astype(np.float32))
    backend.close()
    cuda.close()


def _tensorrt_unusable(manifest) -> str | None:
    reason = cuda_device.unavailable()
    if reason:
        return reason
    try:
        import tensorrt_rtx

        check_engine(manifest, tensorrt_rtx, _device_sm())
    except BelleEdgeError as e:
        return str(e)
    return None


def _close(a, b, what):
    err = float(np.abs(a - b).max())
    scale = max(1.0, float(np.abs(b).max()))
    print(f"{what}: max |tensorrt - onnxruntime| = {err:.3e} (scale {scale:.2f})")
    assert err <= 3e-2 * scale, what


@pytest.mark.gpu
def test_tensorrt_chats_like_onnxruntime(artifact):
    from belle_edge.runtime.artifact import load_artifact

    path, manifest = artifact
    reason = _tensorrt_unusable(manifest)
    if reason:
        pytest.skip(reason)
    trt_model, ort_model = load_artifact(path, backend="tensorrt"), load_artifact(path, backend="onnxruntime")
    assert trt_model.backend_name == "tensorrt"
    trt, ort = trt_model.backend_factory(200), ort_model.backend_factory(200)
    mask = MaskConfig(window=1, sinks=4)
    rng = np.random.default_rng(0)
    vocab = manifest.model.vocab_size
    ids = rng.integers(0, vocab, 70)
    positions, turns = np.arange(70), np.repeat([0, 1, 2], [10, 30, 30])

    def both(i, p, t):  # each backend keeps its own key table: a forward passes only the new tokens
        return [b.forward(i, p, t, mask=mask) for b in (trt, ort)]

    got, ref = both(ids, positions, turns)
    _close(got, ref, "prefill of 70 tokens (3 engine calls)")
    for step in range(6):  # decode, feeding ONNX Runtime's greedy token to both
        n = len(ids)
        ids = np.r_[ids, int(np.argmax(ref))]
        got, ref = both(ids[-1:], np.array([n]), np.array([2]))
        _close(got, ref, f"decode step {step}")
    n = trt.n
    assert n == ort.n
    _close(trt.read_kv(), ort.read_kv(), "KV cache")
    # a new turn evicts turn 1: keep the sinks, the system segment and turn 2 (two runs)
    keep = np.r_[np.arange(10), np.arange(40, n)]
    for b in (trt, ort):
        b.keep(keep)
    assert (trt.keys.positions == ort.keys.positions).all() and trt.n == len(keep)
    new = rng.integers(0, vocab, 12)
    pos = np.arange(n, n + 12)
    _close(*both(new, pos, np.full(12, 3)), "a new turn after eviction")
    # a rollback to fewer tokens, then the same chunk again
    for b in (trt, ort):
        b.truncate(len(keep))
    _close(*both(new[:5], pos[:5], np.full(5, 3)), "after a rollback")
    # save and restore into a fresh session
    saved = trt.read_kv()
    fresh = trt_model.backend_factory(200)
    fresh.write_kv(saved, trt.keys.positions.copy(), trt.keys.turns.copy())
    args = (np.array([7]), np.array([n + 5]), np.array([3]))
    _close(fresh.forward(*args, mask=mask), ort.forward(*args, mask=mask), "restored session")
    # and a real dialogue through the session: three turns, the turn window evicting
    session = trt_model.session(max_new_tokens=6, window=1)
    for message in ("你好", "订单已经发货了吗？", "谢谢你的帮助！"):
        assert session.send(message).stats.new_tokens >= 1
    assert sum(s.evicted_tokens for s in session.stats) > 0


def test_chat_cli_backend_choice(artifact, tiny_llama_dir):
    """`belle-edge chat ART --backend tensorrt` refuses in one line where the engine cannot run; a checkpoint
    refuses the artifact backends."""
    path, _ = artifact
    cli = [sys.executable, "-m", "belle_edge.cli", "chat"]
    reason = cuda_device.unavailable()
    if reason:
        result = subprocess.run([*cli, path, "--backend", "tensorrt"], input="", capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert reason in result.stderr.strip().splitlines()[-1]
    result = subprocess.run([*cli, tiny_llama_dir, "--backend", "onnxruntime"], input="", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "a checkpoint runs on torch" in result.stderr.strip().splitlines()[-1]


@pytest.mark.gpu
def test_kv_pool_device_copies_match_numpy():
    """The TensorRT pool's gathers, scatters and compaction (trt_pool.py), on any CUDA GPU."""
    from belle_edge.runtime.backends.trt_pool import TrtPool

    reason = cuda_device.unavailable()
    if reason:
        pytest.skip(reason)
    cuda = cuda_device.open_device()
    engine = _KvOnlyEngine(cuda, layers=2, kv_heads=2, head_dim=8, max_past=63)
    engine.max_batch = 3
    pool = TrtPool(engine, slots=3, capacity=32)
    with pytest.raises(InputError, match="at most 3 sequences"):
        TrtPool(engine, slots=4, capacity=32)
    rng = np.random.default_rng(0)
    kvs = {s: rng.standard_normal((2, 2, 2, n, 8)).astype(np.float16) for s, n in ((0, 5), (1, 12), (2, 0))}
    for s, kv in kvs.items():
        pool.write_kv(s, kv, np.arange(kv.shape[3]), np.zeros(kv.shape[3], np.int64))
        np.testing.assert_array_equal(pool.read_kv(s), kv.astype(np.float32))
    # gather rows (1, 0, 2) padded to 12 tokens, as the engine's ``past`` would see them
    past, seg = pool._gather([1, 0, 2], 12)
    staged = np.empty((2 * 2, 3, 2, 12, 8), np.float16)
    for lk in range(4):
        cuda.dtoh(staged[lk], past + lk * seg, engine.stream)
    cuda.sync(engine.stream)
    for row, s in enumerate((1, 0, 2)):
        n = kvs[s].shape[3]
        np.testing.assert_array_equal(staged[:, row, :, :n], kvs[s].reshape(4, 2, n, 8))
    # scatter: a fake ``present`` of 12 + 2 tokens per row; rows' last 2 tokens land after each slot's n
    present_host = rng.standard_normal((4, 3, 2, 14, 8)).astype(np.float16)
    out_seg = present_host[0].nbytes
    present = cuda.malloc(4 * out_seg)
    for lk in range(4):
        cuda.htod(present + lk * out_seg, np.ascontiguousarray(present_host[lk]), engine.stream)
    cuda.sync(engine.stream)
    pool._scatter([1, 0, 2], present, out_seg, 12, 2)
    cuda.sync(engine.stream)
    for row, s in enumerate((1, 0, 2)):
        n = kvs[s].shape[3]
        pool.tables[s].append(np.arange(n, n + 2), np.zeros(2, np.int64))
        expected = np.concatenate([kvs[s].reshape(4, 2, n, 8), present_host[:, row, :, 12:]], axis=2)
        np.testing.assert_array_equal(pool.read_kv(s).reshape(4, 2, n + 2, 8), expected.astype(np.float32))
    # compaction within a slot (runs that overlap their destination)
    before = pool.read_kv(1)
    keep = np.array([0, 1, 5, 6, 7, 13])
    pool.keep(1, keep)
    np.testing.assert_array_equal(pool.read_kv(1), before[:, :, :, keep])
    cuda.free(present)
    pool.close()
    cuda.close()

"""TensorRT runtime backend: runs an artifact's ``model.engine`` (built by ``compile/build_engine.py``, same
input/output contract as the ONNX, see ``compile/export_onnx.py``). Imports no torch: TensorRT (``tensorrt``
or ``tensorrt_rtx``, whichever built the engine) plus :mod:`.cuda_device` for memory and streams.

Before anything touches the GPU, :func:`check_engine` compares the engine's manifest record with this machine:
an engine runs only on the TensorRT release that built it and only on the compute capability it was built
for, and TensorRT's own refusal of either is an unhelpful log line (or a crash), so we refuse first with the
command that rebuilds it.

Design, mirroring the ONNX Runtime backend:

* :class:`TrtEngine` (one per loaded model, shared by its sessions): the deserialized engine, one execution
  context per optimization profile (prefill and decode with standard TensorRT; one merged profile with
  TensorRT-RTX), one stream, and small device/pinned staging buffers for the int64 inputs and the logits row.
* :class:`TrtBackend` (one per chat session): two pre-allocated device KV buffers, layout
  (layer, key/value, kv_heads * capacity * head_dim) so a (1, kv_heads, n, head_dim) prefix is contiguous.
  ``past`` is bound from one buffer, TensorRT writes ``present`` (past + new) straight into the other, then
  they swap. Eviction compacts with one 2D copy (rows = heads) per contiguous run of kept slots.
"""
from __future__ import annotations

import os
import shlex
import threading

import numpy as np

from ...errors import BelleEdgeError, ContextFullError, InputError, MissingDependencyError
from ...manifest import Engine, Manifest, Plugin
from ...mask import WINDOW_OFF, MaskConfig
from ...paths import kernels_build_dir
from .base import KeyTable
from .cuda_device import open_device

PLUGIN_ENV = "BELLE_EDGE_PLUGIN"
PLUGIN_FILE = "libbelle_trt_plugin.so"
GRAPHS_ENV = "BELLE_EDGE_TRT_CUDA_GRAPHS"  # "0" switches TensorRT-RTX's CUDA graphs off
FLAVOURS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
ALIGN = 256  # TensorRT wants I/O addresses 256-byte aligned
ID_INPUTS = ("input_ids", "position_ids", "turn_ids", "past_position_ids", "past_turn_ids", "mask_window",
             "mask_sinks", "num_logits_to_keep")


class EngineMismatchError(InputError):
    """The artifact's engine was built for another TensorRT release or GPU than this machine's."""


class EngineRuntimeError(BelleEdgeError):
    """TensorRT refused to load or run an engine that passed the checks; the message carries its error."""


# ------------------------------------------------------------------------------------------- checks (pure)
def engine_of(manifest: Manifest) -> Engine:
    """The artifact's engine (manifest.runtime.engine); refuses an artifact that has none."""
    if manifest.runtime.engine is None:
        raise InputError(f"the {manifest.target} artifact has no TensorRT engine")
    return manifest.runtime.engine


def _describe(flavour: str, version: str) -> str:
    return f"{FLAVOURS.get(flavour, flavour)} {version}"


def rebuild_command(manifest: Manifest, artifact: str, target: str | None = None) -> str:
    """The command(s) that give ``artifact`` an engine for ``target`` (default: its own) on this machine."""
    from ...targets import get_target

    target = target or manifest.target
    settings = manifest.settings
    words = ["belle-edge", "compile"] + ([settings["model"]] if settings.get("model") else [])  # None: default
    words += ["--target", target, "--precision", manifest.precision]
    if manifest.runtime.attention != "plugin":
        words += ["--attention", manifest.runtime.attention]
    if settings.get("max_kv_tokens", 4096) != 4096:
        words += ["--max-kv-tokens", str(settings["max_kv_tokens"])]
    on_device = get_target(target).builds_on_device  # get_target: "orin" is an alias
    words += (["--no-engine"] if on_device else []) + ["--out", artifact, "--force"]
    command = " ".join(shlex.quote(w) for w in words)
    if on_device:  # JetPack's TensorRT builds Orin engines on the Orin itself (jetson/build_engine.sh)
        return f"on the host: {command}; then on this device: belle-edge build-engine {shlex.quote(artifact)}"
    return command


def check_engine(manifest: Manifest, trt_module, device_sm: int, *, artifact: str = "ARTIFACT") -> Engine:
    """Refuse (one line: expected vs got, and how to rebuild) an engine this machine cannot run: another
    TensorRT flavour or release than ``trt_module``, or another compute capability than ``device_sm``.
    Returns the engine's facts."""
    from ...targets import TARGETS, targets_for_sm

    engine = engine_of(manifest)
    where = os.path.join(artifact, engine.file)
    built = _describe(engine.builder, engine.builder_version)
    here = _describe(trt_module.__name__.split(".")[0], trt_module.__version__)
    if engine.sm != device_sm:
        fits = targets_for_sm(device_sm)
        if not fits:
            known = ", ".join(sorted({f"sm_{t.sm}" for t in TARGETS.values() if t.sm}))
            raise EngineMismatchError(f"{where}: built for sm_{engine.sm} ({manifest.target}), but this GPU is "
                                      f"sm_{device_sm}, for which belle-edge has no target (targets: {known}); run "
                                      "the artifact on ONNX Runtime (backend='onnxruntime') or on a matching GPU")
        raise EngineMismatchError(f"{where}: built for sm_{engine.sm} ({manifest.target}), but this GPU is "
                                  f"sm_{device_sm} ({' / '.join(fits)}); rebuild it: "
                                  f"{rebuild_command(manifest, artifact, fits[0])}")
    if built != here:
        raise EngineMismatchError(f"{where}: built with {built}, but this machine has {here} (an engine runs only "
                                  f"on the release that built it); rebuild it here: "
                                  f"{rebuild_command(manifest, artifact)}")
    return engine


def plugin_library(manifest: Manifest, artifact: str) -> str | None:
    """Path of our C++ plugin library when the engine has plugin layers (None when it has none): $BELLE_EDGE_PLUGIN,
    else one shipped in the artifact, else the checkout's ``kernels/build``. Refuses when none exists."""
    engine = engine_of(manifest)
    if engine.plugin is None or not engine.plugin.layers:
        return None
    candidates = [os.environ[PLUGIN_ENV]] if os.environ.get(PLUGIN_ENV) else \
        [os.path.join(artifact, PLUGIN_FILE), os.path.join(kernels_build_dir(), PLUGIN_FILE)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise MissingDependencyError(
        f"{artifact}: its engine has {engine.plugin.layers} belle::DynamicMaskAttention plugin layers and the "
        f"plugin library was not found ({' or '.join(candidates)}); build it (cmake -S kernels -B kernels/build && "
        f"cmake --build kernels/build), set {PLUGIN_ENV}=/path/to/{PLUGIN_FILE}, or compile with --attention native")


def load_plugin(trt, path: str, plugin: Plugin) -> None:
    """Load our plugin library into TensorRT's registry and check that it serves the engine's plugin."""
    registry = trt.get_plugin_registry()
    name, version, namespace = plugin.name, plugin.version, plugin.namespace
    if registry.get_creator(name, version, namespace) is not None:
        return  # already loaded in this process
    if registry.load_library(path) is None:
        raise EngineRuntimeError(f"{path}: TensorRT could not load it as a plugin library (it must export "
                                 "getCreators and be built against this TensorRT)")
    if registry.get_creator(name, version, namespace) is None:
        raise EngineRuntimeError(f"{path}: loaded, but it has no {namespace}::{name} version {version} plugin")


def import_trt(flavour: str):
    """The TensorRT module that built the engine, or any TensorRT here (for the mismatch message)."""
    for name in [flavour] + [f for f in FLAVOURS if f != flavour]:
        try:
            module = __import__(name)
        except ImportError:
            continue
        if hasattr(module, "Runtime"):
            return module
    hint = "pip install 'belle_edge[trt-runtime]'" if flavour == "tensorrt_rtx" else \
        "install the TensorRT release that built it (JetPack, NGC, an SDK)"
    raise MissingDependencyError(f"running a {FLAVOURS.get(flavour, flavour)} engine needs its Python bindings: {hint}")


def open_engine(artifact: str, manifest: Manifest, *, cuda_graphs: bool | None = None) -> "TrtEngine":
    """Every check, cheapest first, then the engine. Raises a one-line BelleEdgeError naming the first that fails."""
    engine = engine_of(manifest)
    trt = import_trt(engine.builder)
    device = open_device()
    try:
        check_engine(manifest, trt, device.compute_capability(), artifact=artifact)
        path = plugin_library(manifest, artifact)
        if path:
            load_plugin(trt, path, engine.plugin)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(GRAPHS_ENV, "1") != "0"
        return TrtEngine(trt, device, os.path.join(artifact, engine.file), manifest, cuda_graphs=cuda_graphs)
    except BaseException:
        device.close()
        raise


# ------------------------------------------------------------------------------------------- the engine
def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _make_logger(trt):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors = (self.errors + [msg])[-5:]

    return Logger()


class TrtEngine:
    """One deserialized engine, its contexts and stream; shared by the sessions of one model (calls are
    serialized by a lock: the contexts, the stream and the staging buffers are shared)."""

    def __init__(self, trt, device, engine_path: str, manifest: Manifest, *, cuda_graphs: bool = True):
        cfg = manifest.model
        self.trt, self.cuda, self.path = trt, device, engine_path
        self.layers, self.kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.vocab_size = cfg.vocab_size
        self.kv_dtype = np.dtype(manifest.runtime.kv_dtype)
        self.lock = threading.Lock()
        self._device_buffers: list[int] = []
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        with open(engine_path, "rb") as f:
            blob = f.read()
        if hasattr(self.runtime, "get_engine_validity"):  # TensorRT-RTX: says why before trying
            validity, diagnostics = self.runtime.get_engine_validity(blob)
            if validity == trt.EngineValidity.INVALID:
                raise EngineMismatchError(f"{engine_path}: TensorRT-RTX says it cannot run here ({diagnostics})")
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        del blob
        if self.engine is None:
            raise EngineRuntimeError(f"{engine_path}: TensorRT could not deserialize it: {self._last_error()}")
        self._check_io()
        self.stream = device.stream()
        self.cuda_graphs = cuda_graphs and hasattr(trt, "CudaGraphStrategy")
        self.contexts = [self._context(p) for p in range(self.engine.num_optimization_profiles)]
        device.sync(self.stream)
        # contexts by the new-token range of their profile, narrowest first: decode picks the decode profile
        self.contexts.sort(key=lambda c: c[1] - c[0])
        self.max_new = max(hi for _, hi, _, _ in self.contexts)
        self.max_past = min(past for _, _, past, _ in self.contexts)
        # sequences per call: the profiles' batch range (compile --max-batch; engines before it take 1)
        self.max_batch = min(self.engine.get_tensor_profile_shape("input_ids", p)[2][0]
                             for p in range(self.engine.num_optimization_profiles))
        seg = lambda n: _align(8 * n) // 8  # noqa: E731  (int64 elements, each segment aligned)
        b = self.max_batch
        self._staging_len = 3 * seg(b * self.max_new) + 2 * seg(b * self.max_past) + 3 * seg(1)
        self._staging_host = device.pinned((self._staging_len,), np.int64)
        self._staging = self._malloc(8 * self._staging_len)
        self._host_inputs = {name: np.zeros((), dtype=np.int64) for name in self.id_inputs
                             if self.engine.get_tensor_location(name) == trt.TensorLocation.HOST}
        self._logits_host = device.pinned((b, self.vocab_size), np.float32)
        self._logits = self._malloc(4 * b * self.vocab_size)

    def _malloc(self, nbytes: int) -> int:
        ptr = self.cuda.malloc(nbytes)
        self._device_buffers.append(ptr)
        return ptr

    def _last_error(self) -> str:
        return self.logger.errors[-1] if self.logger.errors else "no error logged"

    def _check_io(self) -> None:
        """The engine must follow the export contract for this manifest's model (catches a swapped engine)."""
        trt, engine = self.trt, self.engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        kv = {f"{io}.{layer}.{kind}" for layer in range(self.layers) for kind in ("key", "value")
              for io in ("past_key_values", "present")}
        missing = sorted((kv | {"input_ids", "past_position_ids", "logits"}) - names)
        if missing:
            raise EngineMismatchError(f"{self.path}: not this artifact's engine (no tensors {', '.join(missing[:4])})")
        self.id_inputs = [name for name in ID_INPUTS if name in names]  # TensorRT may drop an unused input
        kv_type = {np.dtype(np.float16): trt.DataType.HALF, np.dtype(np.float32): trt.DataType.FLOAT}[self.kv_dtype]
        found = (tuple(engine.get_tensor_shape("logits"))[-1], engine.get_tensor_dtype("logits"),
                 engine.get_tensor_dtype("present.0.key"))
        if found != (self.vocab_size, trt.DataType.FLOAT, kv_type):
            raise EngineMismatchError(f"{self.path}: logits width, logits type, KV type {found}; the manifest says "
                                      f"{(self.vocab_size, trt.DataType.FLOAT, kv_type)}")

    def _context(self, profile: int):
        """(min new tokens, max new tokens, max past, context) for one optimization profile."""
        trt = self.trt
        if self.cuda_graphs and hasattr(self.engine, "create_runtime_config"):
            # TensorRT-RTX captures and replays CUDA graphs itself, per input shape once its shape-specialised
            # kernels are compiled. Standard TensorRT gets none: a graph is tied to shapes and addresses, and
            # decode changes the past length (and the ping-pong KV addresses) every step.
            config = self.engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            context = self.engine.create_execution_context(config)
        else:
            context = self.engine.create_execution_context()
        if context is None:
            raise EngineRuntimeError(f"{self.path}: TensorRT could not create an execution context: "
                                     f"{self._last_error()}")
        if not context.set_optimization_profile_async(profile, int(self.stream)):
            raise EngineRuntimeError(f"{self.path}: profile {profile}: {self._last_error()}")
        new = self.engine.get_tensor_profile_shape("input_ids", profile)  # (min, opt, max) shapes
        past = self.engine.get_tensor_profile_shape("past_position_ids", profile)
        return new[0][1], new[2][1], past[2][1], context

    def run(self, kv_in: int, kv_out: int, slot_bytes: int, values: dict, *, out_bytes: int | None = None) -> np.ndarray:
        """One call: ``values`` holds the int64 inputs, rows (T,) for one sequence or (B, T) for a batch;
        K/V past at ``kv_in``, present to ``kv_out`` (segment (layer, kind) at ``(2 * layer + kind) *
        slot_bytes``, resp. ``out_bytes``). Returns the last token's logits, (V,) or (B, V)."""
        batched = np.ndim(values["input_ids"]) == 2
        values = {k: (np.atleast_2d(v) if np.ndim(v) else v) for k, v in values.items()}
        b, t = values["input_ids"].shape
        p = values["past_position_ids"].shape[1]
        out_bytes = slot_bytes if out_bytes is None else out_bytes
        context = next(c for lo, hi, _, c in self.contexts if lo <= t <= hi)
        fail = lambda what: EngineRuntimeError(f"{self.path}: {what}: {self._last_error()}")  # noqa: E731
        self.logger.errors = []
        offset = 0
        for name in self.id_inputs:
            value = np.asarray(values[name], dtype=np.int64)
            if not context.set_input_shape(name, value.shape):
                raise fail(f"input {name} of shape {value.shape}")
            if name in self._host_inputs:  # a shape input (num_logits_to_keep): TensorRT reads it on the host
                self._host_inputs[name][...] = value
                context.set_tensor_address(name, self._host_inputs[name].ctypes.data)
                continue
            self._staging_host[offset:offset + value.size] = value.reshape(-1)
            context.set_tensor_address(name, self._staging + 8 * offset)
            offset += _align(8 * max(value.size, 1)) // 8
        self.cuda.htod(self._staging, self._staging_host, self.stream, nbytes=8 * offset)
        past_shape = (b, self.kv_heads, p, self.head_dim)
        for layer in range(self.layers):
            for kind, label in enumerate(("key", "value")):
                lk = 2 * layer + kind
                if not context.set_input_shape(f"past_key_values.{layer}.{label}", past_shape):
                    raise fail(f"past_key_values.{layer}.{label} of shape {past_shape}")
                context.set_tensor_address(f"past_key_values.{layer}.{label}", kv_in + lk * slot_bytes)
                context.set_tensor_address(f"present.{layer}.{label}", kv_out + lk * out_bytes)
        # our logits buffer holds max_batch rows: anything else would be written past its end
        if tuple(context.get_tensor_shape("logits")) != (b, 1, self.vocab_size) or b > self.max_batch:
            raise fail(f"logits of shape {tuple(context.get_tensor_shape('logits'))}, expected ({b}, 1, vocab)")
        context.set_tensor_address("logits", self._logits)
        if not context.execute_async_v3(int(self.stream)):
            raise fail(f"inference of {b} x {t} new tokens after {p}")
        self.cuda.dtoh(self._logits_host[:b], self._logits, self.stream)
        self.cuda.sync(self.stream)
        logits = self._logits_host[:b].copy()
        return logits if batched else logits[0]

    def close(self) -> None:
        """Free the GPU side; TensorRT objects go before the engine, the engine before its runtime."""
        if getattr(self, "cuda", None) is None:
            return
        self.contexts = []
        self.engine = None
        self.runtime = None
        for ptr in self._device_buffers:
            self.cuda.free(ptr)
        self._device_buffers = []
        self.cuda.close()
        self.cuda = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class DeviceBuffers:
    """What holds device memory of an engine (a session's cache, a pool): ``_buffers`` freed on close."""

    _buffers: list[int]
    engine: "TrtEngine"

    def close(self) -> None:
        if self._buffers and self.engine.cuda is not None:
            self.engine.cuda.sync(self.engine.stream)
            for ptr in self._buffers:
                self.engine.cuda.free(ptr)
        self._buffers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


# ------------------------------------------------------------------------------------------- one session
class TrtBackend(DeviceBuffers):
    name = "tensorrt"

    def __init__(self, engine: TrtEngine, *, capacity: int):
        self._buffers: list[int] = []
        if capacity > engine.max_past + 1:
            raise InputError(f"max_kv_tokens {capacity}: the engine holds at most {engine.max_past + 1} KV tokens "
                             f"(built with max_past {engine.max_past}); lower it or recompile with a larger "
                             "--max-kv-tokens")
        self.engine, self.cuda = engine, engine.cuda
        self.capacity, self.vocab_size = capacity, engine.vocab_size
        self.layers, self.kv_heads, self.head_dim = engine.layers, engine.kv_heads, engine.head_dim
        self.dtype = engine.kv_dtype
        self._row = self.head_dim * self.dtype.itemsize  # bytes of one token of one head
        self.slot = _align(self.kv_heads * capacity * self._row)  # bytes per (layer, key/value)
        for _ in range(2):  # one by one: close() frees what exists if the second allocation fails
            self._buffers.append(self.cuda.malloc(2 * self.layers * self.slot))
        self._cur = 0
        self.keys = KeyTable(capacity)  # positions and turns of the tokens in the current buffer

    @property
    def n(self) -> int:
        return self.keys.n

    def forward(self, token_ids, positions, turns, *, mask: MaskConfig):
        if self.n + len(token_ids) > self.capacity:  # TensorRT would write present past the buffer's end
            raise ContextFullError(f"{self.n} + {len(token_ids)} tokens: the KV cache holds {self.capacity}")
        with self.engine.lock:
            window = WINDOW_OFF if mask.window is None else mask.window
            logits = None
            for a in range(0, len(token_ids), self.engine.max_new):  # the profiles' longest chunk
                b = min(a + self.engine.max_new, len(token_ids))
                values = {"input_ids": token_ids[a:b], "position_ids": positions[a:b], "turn_ids": turns[a:b],
                          "past_position_ids": self.keys.positions, "past_turn_ids": self.keys.turns,
                          "mask_window": window, "mask_sinks": mask.sinks, "num_logits_to_keep": 1}
                cur, nxt = self._buffers[self._cur], self._buffers[1 - self._cur]
                logits = self.engine.run(cur, nxt, self.slot, values)
                self._cur = 1 - self._cur
                self.keys.append(positions[a:b], turns[a:b])
            return logits

    def _compact(self, runs: list[tuple[int, int, int]], m: int) -> None:
        """Into the other buffer, laid out for ``m`` tokens: each run (from, to, length) of slots, one 2D copy
        per (layer, key/value) — rows are the heads, ``n`` tokens apart in the source and ``m`` in the target."""
        src, dst = self._buffers[self._cur], self._buffers[1 - self._cur]
        for lk in range(2 * self.layers):
            for a, b, length in runs:
                self.cuda.copy2d(dst + lk * self.slot + b * self._row, m * self._row,
                                 src + lk * self.slot + a * self._row, self.n * self._row,
                                 length * self._row, self.kv_heads, self.engine.stream)
        self._cur = 1 - self._cur

    def truncate(self, n: int) -> None:
        """Forget slots [n, ...): repack the first n per head (the layout depends on the token count)."""
        if n != self.n:
            assert n < self.n, (n, self.n)
            with self.engine.lock:
                self._compact([(0, 0, n)], n)
            self.keys.truncate(n)

    def keep(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1  # starts of the contiguous runs
        starts = np.concatenate([[0], breaks]).astype(np.int64)
        ends = np.concatenate([breaks, [len(slots)]]).astype(np.int64)
        with self.engine.lock:
            self._compact([(int(slots[s]), int(s), int(e - s)) for s, e in zip(starts, ends) if e > s], len(slots))
        self.keys.keep(slots)

    def read_kv(self) -> np.ndarray:
        n = self.n
        with self.engine.lock:
            out = np.empty((self.layers, 2, self.kv_heads, n, self.head_dim), dtype=self.dtype)
            for layer in range(self.layers):
                for kind in (0, 1):
                    self.cuda.dtoh(out[layer, kind], self._buffers[self._cur] + (2 * layer + kind) * self.slot,
                                   self.engine.stream)
            self.cuda.sync(self.engine.stream)
        return out.astype(np.float32)

    def write_kv(self, kv: np.ndarray, positions: np.ndarray, turns: np.ndarray) -> None:
        n = kv.shape[3]
        if n > self.capacity:
            raise InputError(f"the saved session holds {n} KV tokens, this one has room for {self.capacity}")
        host = np.ascontiguousarray(kv, dtype=self.dtype)
        with self.engine.lock:
            for layer in range(self.layers):
                for kind in (0, 1):
                    self.cuda.htod(self._buffers[self._cur] + (2 * layer + kind) * self.slot, host[layer, kind],
                                   self.engine.stream)
            self.cuda.sync(self.engine.stream)  # ``host`` is pageable and goes away with this call
        self.keys.load(positions, turns)

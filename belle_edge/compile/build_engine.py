"""The build pass: portable ONNX -> a TensorRT engine for a GPU target, with our attention plugin.

One builder for both TensorRT flavours through a thin shim (:func:`import_tensorrt`): standard TensorRT
(``tensorrt``: JetPack, NGC, an SDK) and TensorRT-RTX (``tensorrt_rtx``, installable from the registry,
which builds ahead of time with no GPU). Facts this relies on (DESIGN.md, checked on our machines):

* TensorRT-RTX is strongly typed: precision comes from the ONNX (export it in fp16); it takes the target
  compute capability explicitly. Its builder accepts SM75/80/86/89/120/121 (not sm_87 Orin or sm_90 H100),
  but its engines run only on RTX-class GPUs: ``targets.BUILDERS`` says which SMs, and which targets use it.
* Its ONNX parser dlopens an unversioned ``libtensorrt_rtx.so`` while looking up plugins; the wheel ships
  only ``.so.1``. So the build runs in a child process whose ``LD_LIBRARY_PATH`` holds a folder with that
  link (:func:`library_env`) — it cannot be set once Python has started.
* With our plugin creator registered, each ``belle.DynamicMaskAttention`` node becomes one PLUGIN_V3 layer.
  ``attention="native"`` exports the graph without the custom node instead (concatenated cache + the ONNX
  ``Attention`` op with an explicit mask), for engines that must not depend on our plugin.

Optimization profiles cover prefill (1..max_prefill new tokens) and decode (1 token), over past lengths
0..max_past: two profiles with standard TensorRT; one profile spanning both with TensorRT-RTX, which
stores the weights once per profile (measured on the default model: 481 MB of weights with two profiles,
269 MB — the fp16 weights — with one) and specialises kernels to shapes at run time anyway. The child
writes ``model.engine`` and ``build.log`` and prints its manifest record.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.stage import measured
from ..errors import BelleEdgeError, InputError, MissingDependencyError
from ..manifest import Engine, Plugin, Profile, StageRecord
from ..paths import cache_or_temp_dir
from ..targets import BUILDERS, Builder, Target

if TYPE_CHECKING:
    from .job import Job

ENGINE_FILE = "model.engine"
LOG_FILE = "build.log"


class EngineBuildError(BelleEdgeError):
    """TensorRT refused the network or failed to build; the message points at the build log."""


def choose_builder(target: Target, module: str | None = None) -> Builder | None:
    """The first of the target's builders (targets.py, in its order of preference) installed here, or the
    one whose Python module is ``module``; None when none is. Refuses a ``module`` the target does not use."""
    builders = [BUILDERS[name] for name in target.builders if BUILDERS[name].module]
    if module is not None:
        builders = [b for b in builders if b.module == module]
        if not builders:
            raise InputError(f"--tensorrt {module}: {target.name} engines are built by "
                             f"{' or '.join(target.builders)} (belle_edge/targets.py)")
    return next((b for b in builders if importlib.util.find_spec(b.module) is not None), None)


def no_builder_error(target: Target) -> InputError:
    ways = "; ".join(f"{name}: {BUILDERS[name].description}" for name in target.builders)
    return InputError(f"no engine builder for {target.name} (sm_{target.sm}) is installed here ({ways}); install "
                      "one, or compile with --no-engine and run belle-edge build-engine where one is")


@dataclass(frozen=True)
class EngineStage:
    """The build stage. Details recorded: ``layers``, ``weight_only_layers`` (DEQUANTIZE layers by the type of
    the weights they read), ``weights_bytes`` (the builder's "Total Weights Memory"), ``compute_capability``
    (TensorRT-RTX), ``builder_peak_rss_mb``,
    ``builder_baseline_rss_mb`` (TensorRT itself, before the model), ``builder_parsed_rss_mb`` (after the ONNX
    parse); the engine's own facts go to the manifest's ``runtime.engine``."""
    target: Target
    builder: Builder
    attention: str  # what the ONNX holds: "plugin" | "native"
    max_prefill: int = 512
    max_kv_tokens: int = 4096  # the profiles' longest past: this or the model's positions, the fewer
    max_batch: int = 1  # the profiles' largest batch (the batched server's sequences per step)

    name = "build"
    reads = "model.onnx of the artifact"
    writes = "model.engine, build.log"

    def run(self, job: "Job") -> StageRecord:
        return measured(self, lambda: self._build(job), reads="model.onnx", writes=(ENGINE_FILE, LOG_FILE))

    def _build(self, job: "Job") -> dict:
        model = job.exported.config if job.exported is not None else job.previous.model
        record = build_engine(os.path.join(job.artifact, "model.onnx"), job.artifact, sm=self.target.sm,
                              attention=self.attention, max_prefill=self.max_prefill, max_batch=self.max_batch,
                              max_past=min(self.max_kv_tokens, model.max_positions), flavour=self.builder.module)
        job.engine = engine_info(record)
        keep = ("layers", "weight_only_layers", "weights_bytes", "compute_capability", "builder_peak_rss_mb",
                "builder_baseline_rss_mb", "builder_parsed_rss_mb")
        return {k: record[k] for k in keep if k in record}


def engine_info(record: dict) -> Engine:
    """The manifest's Engine from what the builder process reported."""
    plugin = record.get("plugin")
    return Engine(file=record["engine"], log=record["log"], builder=record["tensorrt"],
                  builder_version=record["tensorrt_version"], sm=record["sm"], attention=record["attention"],
                  profiles=tuple(Profile(name=p["name"], batch=tuple(p["batch"]), new_tokens=tuple(p["new_tokens"]),
                                         past=tuple(p["past"])) for p in record["profiles"]),
                  plugin=None if not plugin else Plugin(layers=record["plugin_layers"], **plugin),
                  bytes=record["bytes"])


def import_tensorrt(flavour: str | None = None):
    """(module, flavour): the TensorRT module asked for, else standard TensorRT where installed, else
    TensorRT-RTX. Runs in the builder's child process."""
    order = [flavour] if flavour else ["tensorrt", "tensorrt_rtx"]
    for name in order:
        try:
            module = __import__(name)
            if hasattr(module, "Builder"):
                return module, name
        except ImportError:
            continue
    raise MissingDependencyError("no TensorRT: install tensorrt-rtx (pip install 'belle_edge[trt]') or a "
                                 "TensorRT release for your platform (JetPack, NGC)")


def library_env() -> dict:
    """Environment for a child process in which TensorRT-RTX's parser finds its unversioned library."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return dict(os.environ)
    libs = spec.submodule_search_locations[0]
    links = cache_or_temp_dir("tensorrt_rtx_links")  # BELLE_EDGE_CACHE=off: a temporary folder
    for name in os.listdir(libs):
        if ".so." in name:
            link = os.path.join(links, name.split(".so.")[0] + ".so")
            if not os.path.islink(link):
                try:
                    os.symlink(os.path.join(libs, name), link)
                except FileExistsError:
                    pass
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (links, libs, env.get("LD_LIBRARY_PATH")) if p)
    return env


def build_engine(onnx_path: str, out_dir: str, *, sm: int, attention: str, max_batch: int = 1,
                 max_prefill: int = 512, max_past: int = 4096, flavour: str | None = None) -> dict:
    """Build in a child process (see module docstring); returns what it reports."""
    request = {"onnx": onnx_path, "out_dir": out_dir, "sm": sm, "attention": attention, "max_batch": max_batch,
               "max_prefill": max_prefill, "max_past": max_past, "flavour": flavour}
    result = subprocess.run([sys.executable, "-m", __name__, json.dumps(request)], capture_output=True, text=True,
                            env=library_env())
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        reply = json.loads(lines[-1]) if lines else {}
        detail = reply.get("error") or (result.stderr.strip().splitlines() or ["the builder process died"])[-1]
        raise EngineBuildError(f"engine build failed: {detail} (log: {os.path.join(out_dir, LOG_FILE)})")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------- child process
def _build(req: dict) -> dict:
    t0 = time.perf_counter()
    trt, flavour = import_tensorrt(req["flavour"])
    log_path = os.path.join(req["out_dir"], LOG_FILE)
    log = open(log_path, "w")

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.write(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}\n")

    logger = Logger()
    plugin = req["attention"] == "plugin"
    from .trt_plugin import NAME, NAMESPACE, VERSION, register

    creator = register(trt) if plugin else None  # kept alive for the build: the registry holds no reference
    builder = trt.Builder(logger)
    baseline_mb = _rss_mb()  # TensorRT's libraries loaded, no model yet: the fixed part of the peak
    network = builder.create_network(_network_flags(trt, flavour))
    parser = trt.OnnxParser(network, logger)
    if plugin and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(req["onnx"]):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"the ONNX parser refused the model: {errors}")
    parsed_mb = _rss_mb()  # the parser holds the ONNX weights in host memory from here on
    layer_types = [str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers)]
    plugin_layers = layer_types.count("PLUGIN_V3")
    weight_only = _weight_only_layers(network, layer_types)

    config = builder.create_builder_config()
    if flavour == "tensorrt_rtx":
        runs_on = BUILDERS["tensorrt-rtx"].runs_on
        if req["sm"] not in runs_on:
            raise RuntimeError(f"TensorRT-RTX engines do not run on sm_{req['sm']} (they run on {runs_on})")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{req['sm']}"), 0)
    profiles = _profiles(trt, builder, network, config, req, merged=flavour == "tensorrt_rtx")
    engine_path = os.path.join(req["out_dir"], ENGINE_FILE)
    size = _serialize(trt, builder, network, config, engine_path)
    del network, parser, builder, creator
    log.close()
    record = {
        "engine": ENGINE_FILE, "log": LOG_FILE, "tensorrt": flavour, "tensorrt_version": trt.__version__,
        "sm": req["sm"], "attention": req["attention"], "layers": len(layer_types), "plugin_layers": plugin_layers,
        "profiles": profiles, "bytes": size, "seconds": round(time.perf_counter() - t0, 2),
        "weight_only_layers": weight_only,
        "weights_bytes": _logged_weights_bytes(log_path),  # as the builder logged it: what the engine stores
        "builder_peak_rss_mb": round(_peak_rss_mb(), 1),  # the child process that ran TensorRT
        "builder_baseline_rss_mb": round(baseline_mb, 1),  # of which TensorRT itself, before the model
        "builder_parsed_rss_mb": round(parsed_mb, 1),  # after the ONNX parse, before the build
    }
    if flavour == "tensorrt_rtx":
        record["compute_capability"] = str(config.get_compute_capability(0)).rsplit(".", 1)[-1]
    if plugin:
        record["plugin"] = {"name": NAME, "version": VERSION, "namespace": NAMESPACE,
                            "in_engine": _file_contains(engine_path, NAME.encode())}
    return record


def _logged_weights_bytes(log_path: str) -> int | None:
    """The "Total Weights Memory: N bytes" line TensorRT logs at the end of a build (None if absent)."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "Total Weights Memory:" in line:
                return int(line.split("Total Weights Memory:")[1].split()[0])
    return None


def _weight_only_layers(network, layer_types: list[str]) -> dict[str, int]:
    """DEQUANTIZE layers by the type of the constant they read ({"INT4": 96, ...}): the parsed network's own
    account of weights stored below 16 bits (the engine inspector needs a GPU; the engine's size is the
    other check)."""
    out: dict[str, int] = {}
    for i, kind in enumerate(layer_types):
        if kind == "DEQUANTIZE":
            dtype = str(network.get_layer(i).get_input(0).dtype).rsplit(".", 1)[-1]
            out[dtype] = out.get(dtype, 0) + 1
    return out


def _serialize(trt, builder, network, config, path: str) -> int:
    """Build and write the engine; returns its size. Where the API streams the plan out in chunks
    (``build_serialized_network_to_stream``: TensorRT-RTX, recent TensorRT), the whole serialized engine
    never sits in host memory next to the builder's own copy of the weights."""
    with open(path, "wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream"):
            writer = _file_writer(trt, f)
            if not builder.build_serialized_network_to_stream(network, config, writer) or not writer.written:
                raise RuntimeError("TensorRT returned no engine (see the build log)")
            return writer.written
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT returned no engine (see the build log)")
        f.write(serialized)
        return serialized.nbytes


def _file_writer(trt, f):
    """An IStreamWriter that appends each chunk TensorRT hands over to an open file. (TensorRT catches an
    exception raised in write() and reports success anyway: _serialize checks the byte count.)"""

    class FileWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data):
            f.write(data)
            self.written += len(data)
            return len(data)

    return FileWriter()


def _network_flags(trt, flavour: str) -> int:
    if flavour == "tensorrt" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # precision from the ONNX, as RTX
    return 0


def _profiles(trt, builder, network, config, req, *, merged: bool) -> list[dict]:
    """Prefill and decode profiles over (batch, new tokens, past tokens), or one spanning both (tuned for
    decode, the hot path); returns their ranges."""
    b, prefill, past = req["max_batch"], req["max_prefill"], req["max_past"]
    ranges = []
    shapes = ((("prefill+decode", (1, 1, prefill)),) if merged else
              (("prefill", (1, min(64, prefill), prefill)), ("decode", (1, 1, 1))))
    for name, (t_min, t_opt, t_max) in shapes:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if tensor.name == "num_logits_to_keep":
                profile.set_shape_input(tensor.name, [1], [1], [t_max])
            elif tensor.name in ("mask_window", "mask_sinks"):
                continue
            elif tensor.name.startswith("past_key_values."):
                profile.set_shape(tensor.name, (1, dims[1], 0, dims[3]), (1, dims[1], min(256, past), dims[3]),
                                  (b, dims[1], past, dims[3]))
            elif tensor.name.startswith("past_"):
                profile.set_shape(tensor.name, (1, 0), (1, min(256, past)), (b, past))
            else:  # input_ids, position_ids, turn_ids
                profile.set_shape(tensor.name, (1, t_min), (1, t_opt), (b, t_max))
        config.add_optimization_profile(profile)
        ranges.append({"name": name, "batch": [1, b], "new_tokens": [t_min, t_max], "past": [0, past]})
    return ranges


def _file_contains(path: str, needle: bytes, chunk: int = 1 << 22) -> bool:
    """Whether the file holds ``needle`` (the serialized plugin identity), read in chunks."""
    tail = b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":
    try:
        print(json.dumps(_build(json.loads(sys.argv[1]))))
    except Exception as e:  # reported to the parent as one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)

"""The C++ plugin library (kernels/plugin) inside a real TensorRT builder: CMake builds
libbelle_trt_plugin.so against the TensorRT headers named by ``TensorRT_ROOT``, TensorRT-RTX loads it, finds
both creators, and builds engines whose belle.WeightOnlyGemm node (the plugin-node graph variant, INT4 and
INT8 codes) becomes one PLUGIN_V3 layer served by our C++ plugin — the build-time half of the plugin
(formats, shapes, workspace); running it needs a GPU TensorRT-RTX supports.

Needs TensorRT's C++ headers, which no package here ships: set ``TensorRT_ROOT`` to a prefix holding
``include/NvInfer.h`` (a TensorRT SDK, or the headers of NVIDIA's TensorRT OSS repository). Skipped with
that reason otherwise.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from onnx import TensorProto, helper

from belle_edge.compile.gemm_plugin_variant import OP, VERSION, weight_only_function
from belle_edge.ops.weight_only import GROUP, pack_int4, quantize_rtn
from belle_edge.paths import kernels_dir

ROOT = os.environ.get("TensorRT_ROOT", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ROOT or not os.path.isfile(os.path.join(ROOT, "include", "NvInfer.h")),
                       reason="no TensorRT headers: set TensorRT_ROOT to a prefix with include/NvInfer.h"),
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc"),
]
pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")

CHILD = r'''
import json, sys
import tensorrt_rtx as trt
req = json.loads(sys.argv[1])
class Logger(trt.ILogger):
    def __init__(self):
        trt.ILogger.__init__(self)
    def log(self, severity, msg):
        pass
logger = Logger()
registry = trt.get_plugin_registry()
registry.load_library(req["library"])
creators = sorted(f"{c.plugin_namespace}::{c.name}@{c.plugin_version}" for c in registry.all_creators
                  if c.plugin_namespace == "belle")
builder = trt.Builder(logger)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
assert parser.parse_from_file(req["onnx"]), [str(parser.get_error(i)) for i in range(parser.num_errors)]
layers = [str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers)]
plugin = [network.get_layer(i) for i in range(network.num_layers) if layers[i] == "PLUGIN_V3"]
codes_type = str(plugin[0].get_input(1).dtype).rsplit(".", 1)[-1] if plugin else None
config = builder.create_builder_config()
config.num_compute_capabilities = 1
config.set_compute_capability(trt.ComputeCapability.SM86, 0)
profile = builder.create_optimization_profile()
k = req["k"]
profile.set_shape("x", (1, 1, k), (1, 4, k), (2, 64, k))
config.add_optimization_profile(profile)
engine = builder.build_serialized_network(network, config)
print(json.dumps({"creators": creators, "layers": layers, "codes_type": codes_type,
                  "engine_bytes": None if engine is None else engine.nbytes}))
'''


@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory):
    build = tmp_path_factory.mktemp("kernels_build")
    for cmd in (["cmake", "-S", kernels_dir(), "-B", str(build), f"-DTensorRT_ROOT={ROOT}",
                 "-DCMAKE_CUDA_ARCHITECTURES=86", "-DBELLE_PTXAS_VERBOSE=OFF"],
                ["cmake", "--build", str(build), "-j2", "--target", "belle_trt_plugin"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return str(build / "libbelle_trt_plugin.so")


def _variant_graph(path, bits, k=256, n=128):
    """One belle.WeightOnlyGemm node as gemm_plugin_variant.py writes it, INT4 (block 128 on axis 0) or INT8
    (per column, axis 1), fp16 activations and scales."""
    codes, scales = quantize_rtn(torch.randn(k, n) * 0.05, bits, GROUP, torch.float16)
    if bits == 4:
        init = helper.make_tensor("codes", TensorProto.INT4, [k, n], pack_int4(codes).numpy().tobytes(), raw=True)
        attrs = dict(axis=0, block_size=GROUP)
    else:
        init = helper.make_tensor("codes", TensorProto.INT8, [k, n], codes.numpy().tobytes(), raw=True)
        attrs = dict(axis=1, block_size=0)
    sc = helper.make_tensor("scales", TensorProto.FLOAT16, list(scales.shape), scales.numpy().tobytes(), raw=True)
    node = helper.make_node(OP, ["x", "codes", "scales"], ["y"], domain="belle", plugin_namespace="belle",
                            plugin_version=VERSION, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", "t", n])], [init, sc])
    from belle_edge.compile.onnx_builder import OPSET

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("belle", 1)],
                              ir_version=10, functions=[weight_only_function()])
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, path)
    return k


@pytest.mark.parametrize("bits", [4, 8])
def test_tensorrt_builds_the_weight_only_node_with_our_cpp_plugin(tmp_path, plugin_library, bits):
    from belle_edge.compile.build_engine import library_env

    k = _variant_graph(str(tmp_path / "wo.onnx"), bits)
    request = {"library": plugin_library, "onnx": str(tmp_path / "wo.onnx"), "k": k}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(request)], capture_output=True, text=True,
                            env=library_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["creators"] == ["belle::DynamicMaskAttention@1", "belle::WeightOnlyGemm@1"]
    assert report["layers"].count("PLUGIN_V3") == 1 and report["codes_type"] == ("INT4" if bits == 4 else "INT8")
    assert report["engine_bytes"] and report["engine_bytes"] > 0

"""Real TensorRT engines, built ahead of time with TensorRT-RTX and no GPU (DESIGN.md), for rtx3090 (SM86)
with our attention plugin and with TensorRT's native attention. No mocks of TensorRT. (A100 engines are
TensorRT's: TensorRT-RTX engines do not run on SM80.)"""
import json
import os
import shutil

import pytest

from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.errors import InputError
from belle_edge.manifest import read_manifest

from conftest import make_tiny_bloom

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'belle_edge[trt]')")


@pytest.fixture(scope="module")
def tiny_bloom_source(tmp_path_factory, tiny_tokenizer):
    path = str(tmp_path_factory.mktemp("bloom_src"))
    make_tiny_bloom(path, tiny_tokenizer, layers=2, heads=2, head_dim=64)  # a head size the kernels take
    return path


def _build(out, model, target, attention):
    m = compile_model(CompileConfig(out=str(out), model=model, target=target, precision="fp16",
                                    attention=attention, max_kv_tokens=1024, max_prefill=128), progress=False)
    return m, m.stage("build")


@pytest.mark.parametrize("target,sm", [("rtx3090", 86)])
@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_tiny_bloom_engines_carry_their_target_and_attention(tmp_path, tiny_bloom_source, target, sm, attention):
    m, build = _build(tmp_path / "art", tiny_bloom_source, target, attention)
    engine, details = m.runtime.engine, build.details
    assert engine.builder == "tensorrt_rtx" and details["compute_capability"] == f"SM{sm}" and engine.sm == sm
    assert (engine.plugin.layers if engine.plugin else 0) == (2 if attention == "plugin" else 0)
    if attention == "plugin":
        assert (engine.plugin.name, engine.plugin.version, engine.plugin.namespace, engine.plugin.in_engine) == \
            ("DynamicMaskAttention", "1", "belle", True)
    # TensorRT-RTX: one profile spanning prefill and decode (it stores weights once per profile)
    assert [p.name for p in engine.profiles] == ["prefill+decode"]
    assert engine.profiles[0].past == (0, 1024) and engine.profiles[0].new_tokens == (1, 128)
    assert engine.profiles[0].batch == (1, 4)  # rtx3090's default: four dialogues per step (batched serving)
    assert 0 < details["builder_baseline_rss_mb"] <= details["builder_parsed_rss_mb"] <= details["builder_peak_rss_mb"]
    assert build.seconds > 0
    art = read_manifest(str(tmp_path / "art"), verify_hashes=True)
    assert art.runtime.backend == "tensorrt" and art.runtime.engine.file == "model.engine"
    assert art == m  # what compile returned is what a reader gets back
    assert os.path.getsize(tmp_path / "art" / "model.engine") == engine.bytes > 0
    log = (tmp_path / "art" / "build.log").read_text()
    assert "[ERROR]" not in log


def test_an_a100_engine_is_built_by_tensorrt_not_tensorrt_rtx(tmp_path, tiny_bloom_source):
    """TensorRT-RTX's builder accepts SM80, but its engines run only on RTX-class GPUs: the target table
    gives the A100 standard TensorRT alone, so without it compile refuses up front (naming --no-engine)
    and leaves nothing behind; with --no-engine it writes the ONNX for build-engine on a TensorRT machine."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("standard TensorRT is installed here: the A100 engine would be built")
    with pytest.raises(InputError, match=r"no engine builder for a100 \(sm_80\) is installed here .*--no-engine"):
        compile_model(CompileConfig(out=str(tmp_path / "a100"), model=tiny_bloom_source, target="a100",
                                    precision="fp16"), progress=False)
    assert os.listdir(tmp_path) == []
    m = compile_model(CompileConfig(out=str(tmp_path / "a100"), model=tiny_bloom_source, target="a100",
                                    precision="fp16", engine=False), progress=False)
    assert m.runtime.engine is None and not m.runtime.engine_on_device and m.runtime.backend == "tensorrt"


def test_an_orin_artifact_leaves_the_engine_to_the_device(tmp_path, tiny_bloom_source):
    m = compile_model(CompileConfig(out=str(tmp_path / "orin"), model=tiny_bloom_source, target="orin-nano",
                                    precision="fp16", max_kv_tokens=1024), progress=False)
    assert [s.name for s in m.stages] == ["load", "export", "package"]
    assert m.runtime.engine is None and m.runtime.engine_on_device and m.target == "orin-nano"
    # until its engine exists (and for any machine without TensorRT) it chats from its portable fp16 ONNX
    from belle_edge import load

    model = load(str(tmp_path / "orin"))
    assert model.backend_name == "onnxruntime"
    assert model.session(max_new_tokens=4).send("你好").stats.new_tokens >= 1


@pytest.mark.parametrize("target,precision,message", [
    ("rtx3090", "fp8", "precision 'fp8' is not available on target rtx3090"),
    ("a100", "fp8", "precision 'fp8' is not available on target a100"),
    ("rtx3090", "fp32", "precision 'fp32' is not available on target rtx3090"),
])
def test_gpu_targets_refuse_what_they_cannot_build(tmp_path, tiny_bloom_source, target, precision, message):
    with pytest.raises(InputError, match=message):
        CompileConfig(out=str(tmp_path / "x"), model=tiny_bloom_source, target=target, precision=precision)


@pytest.mark.parametrize("target,precision", [("cpu", "fp32"), ("rtx3090", "fp16"), ("a100", "fp16"),
                                              ("orin-agx", "fp16")])
def test_the_default_precision_is_one_the_target_builds(tmp_path, target, precision):
    assert CompileConfig(out=str(tmp_path / "x"), target=target).precision == precision


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rtx3090"])
@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_smollm2_engines(tmp_path, smollm2_checkpoint, target, attention):
    m, build = _build(tmp_path / "art", "smollm2-135m", target, attention)
    engine = m.runtime.engine
    assert (engine.plugin.layers if engine.plugin else 0) == (30 if attention == "plugin" else 0)
    log = (tmp_path / "art" / "build.log").read_text()
    weights = int(log.split("Total Weights Memory: ")[1].split()[0])
    assert weights < 1.05 * m.files["model.onnx.data"].bytes  # the fp16 weights, stored once
    print(json.dumps({**build.details, "seconds": build.seconds, "bytes": engine.bytes}))


def test_an_engine_can_be_built_later_without_torch(tmp_path, tiny_bloom_source):
    """What the Jetson does with an artifact compiled on a host: `belle-edge build-engine`, no torch."""
    import subprocess
    import sys
    import textwrap

    art = tmp_path / "later"
    m = compile_model(CompileConfig(out=str(art), model=tiny_bloom_source, target="rtx3090", precision="fp16",
                                    engine=False, max_kv_tokens=512, max_prefill=64), progress=False)
    assert m.runtime.engine is None and "build" not in [s.name for s in m.stages]
    script = textwrap.dedent('''
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnxruntime"):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, Block())
        from belle_edge.cli import main
        code = main(["build-engine", sys.argv[1]])
        assert "torch" not in sys.modules
        sys.exit(code)
    ''')
    result = subprocess.run([sys.executable, "-c", script, str(art)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout and "sm_86" in result.stdout
    after = read_manifest(str(art), verify_hashes=True)
    assert after.runtime.engine.file == "model.engine" and [s.name for s in after.stages][-2:] == ["build", "package"]
    assert {"model.engine", "build.log"} <= set(after.files)
    again = subprocess.run([sys.executable, "-m", "belle_edge.cli", "build-engine", str(art)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and "already has model.engine" in again.stderr


def test_tensorrt_rtx_refuses_to_build_for_orin(tmp_path, tiny_bloom_source):
    import subprocess
    import sys

    art = tmp_path / "orin"
    compile_model(CompileConfig(out=str(art), model=tiny_bloom_source, target="orin-nx", precision="fp16",
                                max_kv_tokens=512), progress=False)
    result = subprocess.run([sys.executable, "-m", "belle_edge.cli", "build-engine", str(art), "--tensorrt",
                             "tensorrt_rtx"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot build for sm_87" in result.stderr and "Traceback" not in result.stderr
    assert read_manifest(str(art)).runtime.engine is None  # the artifact is as it was


def test_head_sizes_the_kernels_do_not_take_are_refused_before_building(tmp_path, tiny_llama_dir):
    """The tiny LLaMA's 16-wide heads (like a width-pruned BLOOM's) cannot run in our plugin: compile says
    so up front and names the way out, and leaves nothing behind."""
    from belle_edge.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="head size 16 .* --attention native") as e:
        compile_model(CompileConfig(out=str(tmp_path / "x"), model=tiny_llama_dir, target="rtx3090",
                                    precision="fp16"), progress=False)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_qwen2_engine_with_the_default_models_attention_shape(tmp_path, tiny_tokenizer):
    """Qwen2.5-0.5B's attention geometry — 7 query heads per KV head, head size 64 — with q/k/v biases: our
    plugin takes it (group <= 8), and the engine carries one plugin layer per block."""
    from conftest import make_tiny_qwen2

    src = str(tmp_path / "qwen2")
    make_tiny_qwen2(src, tiny_tokenizer, heads=7, kv_heads=1, head_dim=64)
    m, build = _build(tmp_path / "art", src, "rtx3090", "plugin")
    assert m.model.family == "qwen2" and m.model.group_size == 7 and m.model.head_dim == 64
    assert m.runtime.engine.plugin.layers == 2 and build.details["compute_capability"] == "SM86"


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_weight_only_engines_store_their_weights_at_4_and_8_bits(tmp_path, tiny_bloom_source, precision):
    """The engine's weights, as TensorRT-RTX logs them, are what footprint.py says the format stores: INT4
    codes + fp16 group scales (or INT8 + a scale per row) for the linears, fp16 for the rest."""
    from belle_edge.footprint import footprint
    from belle_edge.targets import TARGETS

    m = compile_model(CompileConfig(out=str(tmp_path / "q"), model=tiny_bloom_source, target="rtx3090",
                                    precision=precision, calibration_tokens=64, max_kv_tokens=1024, max_prefill=128),
                      progress=False)
    build = m.stage("build").details
    n_linears = m.model.num_layers * 4  # qkv, o, up, down
    assert build["weight_only_layers"] == {precision.upper(): n_linears}
    want = footprint(m.model, TARGETS["rtx3090"], precision).weights_bytes
    assert abs(build["weights_bytes"] - want) <= 0.01 * want, (build["weights_bytes"], want)
    fp16 = footprint(m.model, TARGETS["rtx3090"], "fp16").weights_bytes
    assert build["weights_bytes"] < fp16
    assert m.stage("fidelity").details["tokens"] > 0 and os.path.isfile(tmp_path / "q" / "model.gemm_plugin.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_default_model_weight_only_engines(tmp_path, precision):
    """The default model (Qwen2.5-0.5B) at int4 (AWQ) and int8 for the RTX 3090: the engine's weights are the
    quantized format's bytes (fp16: 1.26 GB; int8 0.90; int4 0.73, of which 0.54 the fp16 head and embedding),
    and its fidelity is in the manifest."""
    from belle_edge.footprint import footprint
    from belle_edge.targets import TARGETS

    m = compile_model(CompileConfig(out=str(tmp_path / "art"), target="rtx3090", precision=precision,
                                    calibration_tokens=256, fidelity_tokens=256), progress=False)
    build = m.stage("build").details
    want = footprint(m.model, TARGETS["rtx3090"], precision).weights_bytes
    assert abs(build["weights_bytes"] - want) <= 0.001 * want, (build["weights_bytes"], want)
    assert build["weight_only_layers"] == {precision.upper(): m.model.num_layers * 4}
    fid = m.stage("fidelity").details
    # measured at 768 tokens (benchmarks/results/weight_only.md): int8 top-1 ~97%, int4-awq ~77%
    assert fid["top1_agreement"] >= (0.93 if precision == "int8" else 0.65), fid
    print(json.dumps({"precision": precision, "build": build, "fidelity": {k: fid[k] for k in
                                                                           ("kl_mean", "top1_agreement")}}))
    shutil.rmtree(tmp_path / "art")  # 1.6-1.8 GB of ONNX and engine: not kept with pytest's last runs

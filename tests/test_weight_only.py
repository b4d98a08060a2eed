"""Weight-only quantization for the GPU targets (compile/weight_only.py) and its ONNX contract, on tiny LLaMA,
BLOOM and Qwen2 models whose linears are 128 wide (one INT4 group): the ONNX runs on onnxruntime here, so its
fidelity is measured by running it."""
import os
import subprocess

import numpy as np
import pytest
import torch

from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.compile.weight_only import (GROUP, WeightOnlyRequest, fake_quantize, quantize_weight_only,
                                            signed_codes)
from belle_edge.core.load import load_checkpoint
from belle_edge.errors import InputError
from belle_edge.mask import MaskConfig
from belle_edge.models.decoder import Decoder

from conftest import make_tiny_bloom, make_tiny_llama, make_tiny_qwen2

CALIBRATION = ("The quick brown fox jumps over the lazy dog. " * 20, "你好，今天天气很好，我们去公园散步吧。" * 20)


@pytest.fixture(scope="module", params=["llama", "bloom", "qwen2"])
def wide_model(request, tmp_path_factory, tiny_tokenizer):
    """A tiny model of each family with 128-wide inputs (INT4 groups of 128 fit)."""
    path = str(tmp_path_factory.mktemp(f"wide_{request.param}"))
    if request.param == "llama":
        make_tiny_llama(path, tiny_tokenizer, hidden=256, intermediate=256)  # head size 64: the plugin's
    elif request.param == "bloom":
        make_tiny_bloom(path, tiny_tokenizer, heads=2, head_dim=64)
    else:
        make_tiny_qwen2(path, tiny_tokenizer, heads=2, kv_heads=1, head_dim=64, intermediate=256)
    return path


def _logits(cfg, state_dict, ids):
    model = Decoder.from_state_dict(cfg, state_dict)
    with torch.no_grad():
        return model(torch.tensor(ids)[None], np.arange(len(ids)), np.zeros(len(ids), np.int64), MaskConfig.off())[0]


def test_symmetric_codes_round_trip():
    w = torch.randn(8, 256)
    for bits, group in ((4, 128), (8, None)):
        dq = fake_quantize(w, bits, group)
        qmax = (1 << (bits - 1)) - 1
        step = w.view(8, -1, group or 256).abs().amax(-1) / qmax
        err = (dq - w).view(8, -1, group or 256).abs().amax(-1)
        assert (err <= step * 0.5 + 1e-3).all()  # half a step at most, from fp16 scales too


def test_awq_folds_its_scales_without_changing_the_float_model(wide_model):
    """The scales moved into norms (and v/up rows) and the linears' inputs cancel exactly: only the rounding
    of the quantized weights may change the logits."""
    ckpt = load_checkpoint(wide_model)
    cfg = ckpt.config
    dense, quantized, record, plan = quantize_weight_only(cfg, ckpt.state_dict, ckpt.tokenizer, WeightOnlyRequest(
        "int4", "awq", texts=CALIBRATION, calibration_tokens=128))
    assert record["awq"]["scaling_groups"] == len(plan.alphas) > 0
    ids = ckpt.tokenizer.encode("hello world, 你好").ids
    ref = _logits(cfg, ckpt.state_dict, ids)
    assert torch.allclose(_logits(cfg, _unrounded(cfg, ckpt.state_dict, dense, quantized, plan), ids), ref,
                          atol=1e-3, rtol=1e-3)
    assert any(name.endswith(".o") for name in plan.alphas)  # v -> o, GQA models (LLaMA, Qwen2) included


def _unrounded(cfg, original, dense, quantized, plan):
    """The weights AWQ quantizes, before rounding: each linear's input channels times its group's scales, and
    v_proj / up_proj rows divided by the scales of the group they feed (o / down)."""
    kinds = {"qkv": ["attn.q_proj", "attn.k_proj", "attn.v_proj"], "o": ["attn.o_proj"],
             "mlp": ["mlp.gate_proj", "mlp.up_proj"] if cfg.mlp == "swiglu" else ["mlp.up_proj"],
             "down": ["mlp.down_proj"]}
    out = dict(dense)
    out.update({name: original[name].float().clone() for name in quantized})
    for group, s in plan.scales.items():
        layer, kind = group.split(".")[1], group.split(".")[2]
        for t in kinds[kind]:
            out[f"layers.{layer}.{t}.weight"] = out[f"layers.{layer}.{t}.weight"] * torch.from_numpy(s)[None]
    for group, s in plan.scales.items():
        layer, kind = group.split(".")[1], group.split(".")[2]
        previous = {"o": "attn.v_proj", "down": "mlp.up_proj"}.get(kind)
        s = torch.from_numpy(s)
        if kind == "o":  # under GQA the query heads of one v head share its factor: one per v channel
            s = s.view(cfg.num_kv_heads, cfg.group_size, cfg.head_dim)[:, 0].reshape(-1)
        if previous:
            out[f"layers.{layer}.{previous}.weight"] = out[f"layers.{layer}.{previous}.weight"] / s[:, None]
    return out


@pytest.mark.parametrize("precision,method", [("int4", "rtn"), ("int4", "awq"), ("int8", "rtn")])
def test_a_gpu_artifact_with_weight_only_linears_runs_on_onnxruntime(tmp_path, wide_model, precision, method):
    """The ONNX contract (export_onnx.py): INT4/INT8 initializers and DequantizeLinear feeding each
    projection's MatMul, run by onnxruntime, following the model it was quantized from."""
    import onnx

    out = tmp_path / "art"
    m = compile_model(CompileConfig(out=str(out), model=wide_model, target="orin", precision=precision,
                                    quant_method=method, calibration_tokens=128, max_kv_tokens=256), progress=False)
    assert [s.name for s in m.stages] == ["load", "quantize", "export", "fidelity", "package"]
    q = m.stage("quantize").details
    assert (q["layout"], q["method"], q["bits"]) == ("symmetric", method, int(precision[3:]))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    cfg = m.model
    assert len(dq) == cfg.num_layers * (4 if cfg.mlp == "swiglu" else 4)  # qkv, o, (gate_)up, down
    kinds = {i.name: i.data_type for i in graph.initializer}
    want = onnx.TensorProto.INT4 if precision == "int4" else onnx.TensorProto.INT8
    assert all(kinds[n.input[0]] == want for n in dq)
    attrs = {a.name: a.i for a in dq[0].attribute}
    assert attrs == ({"axis": 0, "block_size": GROUP} if precision == "int4" else {"axis": 1})
    fid = m.stage("fidelity").details
    assert set(fid["texts"]) and fid["tokens"] > 0
    assert fid["kl_mean"] < (0.005 if precision == "int8" else 0.05)  # random tiny models: flat distributions
    # the Jetson builds the engine from it: jetson/build_engine.sh, here as a dry run
    script = os.path.join(os.path.dirname(__file__), "..", "jetson", "build_engine.sh")
    result = subprocess.run(["bash", script, str(out), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for fragment in (f"weights: {precision} weight-only", "tensorrt.__version__", f"build-engine {out} --tensorrt "
                     "tensorrt", "-DCMAKE_CUDA_ARCHITECTURES=87"):
        assert fragment in result.stdout, (fragment, result.stdout)


@pytest.mark.parametrize("precision,head,int8_share", [("int4", "fp16", 0.0), ("int8", "int8", 0.0),
                                                      ("int4", "fp16", 0.4)])
def test_the_onnx_computes_what_the_quantized_weights_say(tmp_path, wide_model, precision, head, int8_share):
    """`belle-edge quantize` for a GPU target, then compile from its folder: onnxruntime's logits from the
    DequantizeLinear graph match the torch model holding the dequantized weights (fp16 activations aside),
    and the folder is refused for the cpu target, whose blocks have zero points."""
    from belle_edge.compile.fidelity import run_onnx_logits
    from belle_edge.compile.quantize import quantize_to_folder
    from belle_edge.core.quantized import read_quantized
    from belle_edge.runtime.backends.ort_backend import make_session

    ckpt = load_checkpoint(wide_model)
    _, record = quantize_to_folder(ckpt, precision, str(tmp_path / "q"), weight_only=WeightOnlyRequest(
        precision, "awq", head=head, texts=CALIBRATION, calibration_tokens=128, int8_share=int8_share))
    if int8_share:  # the most sensitive tensors at int8, at least the share asked for
        assert record["int8_share"]["got"] >= int8_share and record["int8_share"]["tensors"]
        assert record["tensors_by_bits"]["8"] == len(record["int8_share"]["tensors"])
    assert os.path.isfile(tmp_path / "q" / "plan.safetensors")
    m = compile_model(CompileConfig(out=str(tmp_path / "art"), model=str(tmp_path / "q"), target="orin-nx",
                                    max_kv_tokens=256), progress=False)
    assert m.precision == precision and "fidelity" in [s.name for s in m.stages]
    q, _ = read_quantized(str(tmp_path / "q"))
    weights = dict(q.state_dict)
    weights.update({name: torch.from_numpy(t.dequantize()) for name, t in q.quantized.items()})
    assert all(np.array_equal(signed_codes(t), np.clip(signed_codes(t), -8, 7)) for t in q.quantized.values()
               if t.bits == 4)
    ids = np.asarray(ckpt.tokenizer.encode("The quick brown fox, 你好世界。" * 3).ids, np.int64)
    want = _logits(q.config, weights, ids).numpy()
    got = run_onnx_logits(make_session(str(tmp_path / "art" / "model.onnx")), q.config, ids, chunk=7)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max() + 1e-3
    # the plugin-node variant: one belle.WeightOnlyGemm per pair, same weights file, same numbers
    variant = m.stage("export").details["gemm_plugin_variant"]
    assert variant["nodes"] >= q.config.num_layers * 4 + (head == "int8")  # mixed widths: q, k, v apart
    plugin = run_onnx_logits(make_session(str(tmp_path / "art" / variant["file"])), q.config, ids, chunk=7)
    assert np.array_equal(plugin, got)
    with pytest.raises(InputError, match="quantized for GPU targets"):
        compile_model(CompileConfig(out=str(tmp_path / "cpu"), model=str(tmp_path / "q"), target="cpu",
                                    precision=precision), progress=False)
    assert not os.path.exists(tmp_path / "cpu")


def test_bad_requests_are_refused_up_front(tmp_path, wide_model):
    with pytest.raises(InputError, match="--quant-method 'gptq'"):
        CompileConfig(out=str(tmp_path / "a"), model=wide_model, target="rtx3090", precision="int4",
                      quant_method="gptq")
    with pytest.raises(InputError, match="--head 'int4'"):
        CompileConfig(out=str(tmp_path / "a"), model=wide_model, target="rtx3090", precision="int4", head="int4")

"""The weight-only GEMM op on the CPU (its reference path) and what the torch backend builds on it: the
packing is the ONNX contract's byte for byte (onnxruntime's DequantizeLinear -> MatMul over our bytes gives
our numbers), fused projections change no logit, and a weight-only session runs. The CUDA kernels are
checked against this reference on a GPU (tests/gpu/test_weight_only_cuda.py)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from belle_edge.api import torch_chat_model
from belle_edge.core.load import load_checkpoint
from belle_edge.errors import InputError
from belle_edge.mask import MaskConfig
from belle_edge.models.decoder import Decoder
from belle_edge.ops.weight_only import (GROUP, WeightOnlyLinear, dequantize, pack_int4, quantize_linears,
                                        quantize_rtn, reference_gemm, unpack_int4, weight_only_gemm)


def test_int4_packing_round_trips_with_the_even_column_in_the_low_nibble():
    codes = torch.randint(-8, 8, (6, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == (int(codes[0, 0]) & 0xF) | ((int(codes[0, 1]) & 0xF) << 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_half_a_step(bits):
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize_rtn(w, bits, GROUP, torch.float32)
    packed = pack_int4(codes) if bits == 4 else codes
    back = dequantize(packed, scales, bits, GROUP, torch.float32)
    step = scales.repeat_interleave(GROUP, 0) if bits == 4 else scales.expand_as(w)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


def _onnx_weight_only(k, n, bits, packed, scales):
    """DequantizeLinear -> MatMul exactly as export_onnx.py writes it (INT4: block 128 on axis 0; INT8:
    per column, axis 1), with our bytes as the initializer's raw data."""
    if bits == 4:
        init = helper.make_tensor("codes", TensorProto.INT4, [k, n], packed.numpy().tobytes(), raw=True)
        dq = helper.make_node("DequantizeLinear", ["codes", "scales"], ["w"], axis=0, block_size=GROUP)
    else:
        init = helper.make_tensor("codes", TensorProto.INT8, [k, n], packed.numpy().tobytes(), raw=True)
        dq = helper.make_node("DequantizeLinear", ["codes", "scales"], ["w"], axis=1)
    sc = helper.make_tensor("scales", TensorProto.FLOAT, list(scales.shape), scales.numpy().ravel().tolist())
    graph = helper.make_graph([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], "wo",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [init, sc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    # as written: ORT's optimizer would fuse the pair into MatMulNBits, which may quantize the activations
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
def test_the_layout_is_the_onnx_contracts(bits):
    k, n = 256, 96
    g = torch.Generator().manual_seed(2)
    codes, scales = quantize_rtn(torch.randn(k, n, generator=g), bits, GROUP, torch.float32)
    packed = pack_int4(codes) if bits == 4 else codes
    x = torch.randn(5, k, generator=g)
    ours = reference_gemm(x, packed, scales, None, bits, GROUP)
    theirs = _onnx_weight_only(k, n, bits, packed, scales).run(None, {"x": x.numpy()})[0]
    assert np.abs(ours.numpy() - theirs).max() < 1e-4


def test_the_op_and_module_match_the_float_linear_closely():
    torch.manual_seed(3)
    lin = torch.nn.Linear(256, 64, bias=True)
    x = torch.randn(2, 3, 256)
    for bits, tol in ((8, 0.02), (4, 0.25)):
        mod = WeightOnlyLinear.from_linear(lin, bits)
        assert mod.out_features == 64 and mod.codes.shape == (256, 32 if bits == 4 else 64)
        got = mod(x)
        assert got.shape == (2, 3, 64)
        rel = ((got - lin(x)).norm() / lin(x).norm()).item()
        assert rel < tol, (bits, rel)
        same = weight_only_gemm(x, mod.codes, mod.scales, mod.bias, bits, GROUP)
        assert torch.equal(same, got)


def _logits(decoder, ids):
    t = ids.shape[1]
    turns = np.repeat(np.arange(1, 4), -(-t // 3))[:t]
    with torch.no_grad():
        return decoder(ids, np.arange(t), turns, MaskConfig(window=1, sinks=2))


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_bloom_dir", "tiny_qwen2_dir"])
def test_fused_projections_change_no_logit(request, which):
    ckpt = load_checkpoint(request.getfixturevalue(which))
    plain = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    fused = Decoder.from_state_dict(ckpt.config, ckpt.state_dict).fuse_projections()
    assert fused.layers[0].attn.qkv_proj is not None and not hasattr(fused.layers[0].attn, "q_proj")
    assert (fused.layers[0].mlp.gate_up_proj is not None) == (ckpt.config.mlp == "swiglu")
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    assert (_logits(plain, ids) - _logits(fused, ids)).abs().max().item() < 1e-5


def test_quantize_linears_swaps_every_linear_but_the_head(tiny_llama_dir):
    ckpt = load_checkpoint(tiny_llama_dir)
    decoder = Decoder.from_state_dict(ckpt.config, ckpt.state_dict).fuse_projections()
    reference = _logits(Decoder.from_state_dict(ckpt.config, ckpt.state_dict), torch.arange(24)[None] % ckpt.config.vocab_size)
    record = quantize_linears(decoder, 8)
    assert record["linears"] == 4 * ckpt.config.num_layers  # qkv, o, gate_up, down
    assert record["kept"] in ([], ["lm_head"])
    assert isinstance(decoder.layers[0].attn.qkv_proj, WeightOnlyLinear)
    got = _logits(decoder, torch.arange(24)[None] % ckpt.config.vocab_size)
    assert (got - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def test_a_weight_only_session_replies_and_bad_options_are_refused(tiny_llama_dir):
    ckpt = load_checkpoint(tiny_llama_dir)
    with pytest.raises(InputError, match="weight_only 'int3'"):
        torch_chat_model(ckpt, weight_only="int3")
    model = torch_chat_model(ckpt, weight_only="int8", fuse=True)
    session = model.session(window=1, sinks=2, max_new_tokens=6)
    reply = session.send("你好")
    assert reply.stats.new_tokens > 0


def test_an_int4_session_on_a_model_wide_enough_for_groups(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_qwen2

    make_tiny_qwen2(str(tmp_path), tiny_tokenizer, heads=2, kv_heads=1, head_dim=64, intermediate=256)
    ckpt = load_checkpoint(str(tmp_path))
    decoder = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    model = torch_chat_model(ckpt, decoder=decoder, weight_only="int4", fuse=True)
    assert isinstance(decoder.layers[0].mlp.gate_up_proj, WeightOnlyLinear)
    assert decoder.layers[0].mlp.gate_up_proj.codes.shape == (128, 256)  # [K, 2 * 256 / 2]
    reply = model.session(window=1, sinks=2, max_new_tokens=6).send("你好")
    assert reply.stats.new_tokens > 0


def test_the_cli_takes_weight_only_and_refuses_a_bad_one(tiny_llama_dir, capsys):
    from belle_edge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", tiny_llama_dir, "--weight-only", "int3"])
    assert e.value.code != 0 and "int3" in capsys.readouterr().err

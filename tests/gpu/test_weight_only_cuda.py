"""The weight-only GEMM kernels (kernels/src/weight_only.cu) against the reference of belle_edge/ops/weight_only.py,
and the torch backend with weight-only linears and fused projections on CUDA.

The kernels dequantize exactly as the reference does (code x scale rounded once to the dtype), so the
dequantize entry point must match it bit for bit; the GEMM differs only by fp32 summation order:
|y - ref| <= atol + rtol |ref| with the reference computed in fp32 over the same dequantized weights.
Shapes cover the decode path (m 1-8, with and without split-K), the prefill path (m 9, 64, 200), column
counts that leave a partial 128-column tile, the default model's widths (896, 4864) and a 3B layer's.
"""
import pytest
import torch

from belle_edge.ops.weight_only import (GROUP, cuda_dequantize, dequantize, pack_int4, quantize_rtn,
                                        weight_only_gemm)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

TOL = {torch.float16: (2e-2, 5e-3), torch.bfloat16: (1e-1, 2e-2)}  # (atol, rtol)
SHAPES = [(1, 896, 896), (1, 4864, 896), (3, 1024, 3072), (8, 3072, 8192), (2, 160, 256), (9, 3072, 3072),
          (64, 896, 4864), (200, 480, 512), (5, 96, 128)]


def _weights(k, n, bits, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scales = quantize_rtn(torch.randn(k, n, generator=g) * 0.05, bits, GROUP, dtype)
    packed = pack_int4(codes) if bits == 4 else codes
    return packed.cuda(), scales.cuda()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_kernel_is_bit_exact(bits, dtype):
    codes, scales = _weights(512, 352 if bits == 4 else 336, bits, dtype)
    got = cuda_dequantize(codes, scales, bits, GROUP, dtype)
    ref = dequantize(codes.cpu(), scales.cpu(), bits, GROUP, dtype).cuda()
    assert torch.equal(got, ref), (got.float() - ref.float()).abs().max().item()


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_matches_the_reference(m, n, k, bits, dtype):
    if bits == 4 and k % GROUP:
        pytest.skip("INT4 needs k % 128 == 0")
    codes, scales = _weights(k, n, bits, dtype, seed=m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if m % 2 else None
    w = dequantize(codes.cpu(), scales.cpu(), bits, GROUP, dtype).cuda().float()
    ref = x.float() @ w + (0 if bias is None else bias.float())
    for _ in range(2):  # twice: the split-K tile counters must be left at zero by the first call
        got = weight_only_gemm(x, codes, scales, bias, bits, GROUP).float()
        atol, rtol = TOL[dtype]
        err = ((got - ref).abs() - rtol * ref.abs()).max().item()
        assert err <= atol, f"m={m} n={n} k={k} int{bits} {dtype}: excess error {err:.3e}"


def test_gemm_inside_a_cuda_graph_replays():
    codes, scales = _weights(3072, 1024, 4, torch.float16)
    x = torch.randn(1, 3072, device="cuda", dtype=torch.float16)
    ref = weight_only_gemm(x, codes, scales, None, 4, GROUP)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        weight_only_gemm(x, codes, scales, None, 4, GROUP)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = weight_only_gemm(x, codes, scales, None, 4, GROUP)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("weight_only", [None, "int8", "int4"])
def test_a_cuda_session_with_fused_and_weight_only_linears_replies_as_the_cpu_reference(
        tmp_path, tiny_tokenizer, weight_only):
    """A Qwen2-shaped model 128 wide with head dim 64 (so INT4 groups and the attention kernels both apply).
    Same codes on both sides (RTN is deterministic; the CPU model in fp32 dequantizes in fp32, the GPU in
    fp16), so greedy replies of a few tokens agree."""
    from belle_edge.api import torch_chat_model
    from belle_edge.core.load import load_checkpoint
    from conftest import make_tiny_qwen2

    make_tiny_qwen2(str(tmp_path), tiny_tokenizer, heads=2, kv_heads=1, head_dim=64, intermediate=256)
    ckpt = load_checkpoint(str(tmp_path))
    cpu = torch_chat_model(ckpt, weight_only=weight_only, fuse=True).session(window=1, sinks=2, max_new_tokens=8)
    gpu = torch_chat_model(ckpt, device="cuda", dtype="float16", weight_only=weight_only).session(
        window=1, sinks=2, max_new_tokens=8)
    same = sum(cpu.send(m).text == gpu.send(m).text for m in ("你好", "订单已经发货了吗？", "谢谢"))
    print(f"weight_only={weight_only}: {same}/3 replies identical on CUDA fp16 vs CPU fp32")
    assert same >= 2

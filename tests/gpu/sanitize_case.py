"""A small prefill and a small decode through the CUDA kernels, for compute-sanitizer (memcheck): out-of-bounds
or misaligned accesses in the kernels fail the run. Run from the repository root on a GPU machine:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/gpu/sanitize_case.py
"""
import torch

from belle_edge.mask import WINDOW_OFF
from belle_edge.ops.attention import dynamic_mask_attention, reference_attention


def case(d, dtype, t, past, group, rope, alibi, window):
    dev, hkv, cap = "cuda", 2, past + t + 5  # odd sizes: partial tiles, a cache with spare slots
    h = hkv * group
    q = torch.randn(1, h, t, d, device=dev, dtype=dtype)
    k, v = torch.randn(1, hkv, t, d, device=dev, dtype=dtype), torch.randn(1, hkv, t, d, device=dev, dtype=dtype)
    kc, vc = torch.randn(1, hkv, cap, d, device=dev, dtype=dtype), torch.randn(1, hkv, cap, d, device=dev, dtype=dtype)
    pos = torch.arange(past + t, device=dev)[None]
    turn = (pos // 37) + 1
    args = dict(start=torch.tensor([past], dtype=torch.int32, device=dev), q_pos=pos[:, past:], q_turn=turn[:, past:],
                k_pos=pos, k_turn=turn, window=torch.tensor([window], device=dev), sinks=torch.tensor([4], device=dev),
                alibi_slopes=torch.full((h,), 0.25, device=dev, dtype=dtype) if alibi else None,
                rope_inv_freq=(1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d)) if rope else None,
                scale=d ** -0.5, max_keys=cap)
    got = dynamic_mask_attention(q, k, v, kc, vc, **args)
    ref = reference_attention(q, k, v, kc.clone(), vc.clone(), **args)
    torch.cuda.synchronize()
    return (got.float() - ref.float()).abs().max().item()


errs = [case(64, torch.float16, 70, 130, 3, True, False, 1), case(128, torch.bfloat16, 33, 0, 1, False, True, WINDOW_OFF),
        case(64, torch.float16, 1, 200, 8, True, True, 2), case(128, torch.float16, 1, 515, 2, False, False, WINDOW_OFF)]
print("sanitize cases ran; max abs errors", ["%.1e" % e for e in errs])

# the weight-only GEMM: decode rows with split-K (a partial column tile), and the prefill path
from belle_edge.ops.weight_only import GROUP, pack_int4, quantize_rtn, reference_gemm, weight_only_gemm  # noqa: E402


def gemm_case(m, n, k, bits):
    codes, scales = quantize_rtn(torch.randn(k, n) * 0.05, bits, GROUP, torch.float16)
    codes = (pack_int4(codes) if bits == 4 else codes).cuda()
    scales = scales.cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    got = weight_only_gemm(x, codes, scales, None, bits, GROUP)
    ref = reference_gemm(x.float().cpu(), codes.cpu(), scales.float().cpu(), None, bits, GROUP)
    torch.cuda.synchronize()
    return (got.float().cpu() - ref).abs().max().item()


gemm_errs = [gemm_case(1, 160, 1024, 4), gemm_case(5, 96, 512, 8), gemm_case(70, 224, 256, 4)]
print("weight-only cases ran; max abs errors", ["%.1e" % e for e in gemm_errs])

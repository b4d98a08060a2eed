"""Weight-only GEMV/GEMM on a CUDA GPU: our kernels (belle::weight_only_gemm) against cuBLAS in fp16, and the
whole 3B-shaped decode at INT8/INT4. Called by attention_gpu.py, so every ratio comes from one run.

1. per layer shape of a 3B LLaMA (fused qkv, o, fused gate/up, down), 1 and 4 rows (decode): time of ours at
   INT4 and INT8 against ``x @ W`` with W in fp16 (cuBLAS), and the bandwidth ours reaches (bytes of codes,
   scales, x and y over the time) as a share of the measured copy bandwidth;
2. one prefill shape (512 rows): ours against cuBLAS fp16 and against dequantize-then-cuBLAS;
3. end to end: the torch backend's decode with every linear weight-only (RTN; the head stays fp16), and the
   projection to a Jetson Orin AGX: bytes per token / its 204.8 GB/s x the share of bandwidth reached here.
"""
from __future__ import annotations

import copy

import torch

from belle_edge.ops.weight_only import GROUP, cuda_dequantize, pack_int4, quantize_linears, quantize_rtn, weight_only_gemm
from belle_edge.targets import get_target

# (name, K, N) of Llama-3.2-3B's linears with q/k/v and gate/up fused
SHAPES_3B = [("qkv", 3072, 5120), ("o", 3072, 3072), ("gate_up", 3072, 16384), ("down", 8192, 3072)]
EDGE_LLM_ORIN_TOK_S = 71.8  # TensorRT-Edge-LLM, Qwen2.5-3B W4A16 on Orin AGX, JetPack 6.2 (DESIGN.md)


def _weights(k, n, bits, device="cuda"):
    codes, scales = quantize_rtn(torch.randn(k, n, device=device) * 0.02, bits, GROUP, torch.float16)
    return (pack_int4(codes) if bits == 4 else codes).contiguous(), scales.contiguous()


def gemv_rows(cuda_time, copy_gb_s: float, shapes=SHAPES_3B, device="cuda") -> list[dict]:
    rows = []
    for name, k, n in shapes:
        w16 = torch.randn(k, n, device=device, dtype=torch.float16) * 0.02
        for m in (1, 4):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            t16 = cuda_time(lambda: x @ w16)
            row = {"shape": name, "k": k, "n": n, "m": m, "cublas_fp16_ms": round(t16, 4),
                   "cublas_fp16_bw_share": round(2 * k * n / (t16 / 1e3) / 1e9 / copy_gb_s, 3)}
            for bits in (4, 8):
                codes, scales = _weights(k, n, bits, device)
                t = cuda_time(lambda: weight_only_gemm(x, codes, scales, None, bits, GROUP))
                moved = codes.numel() + scales.numel() * 2 + 2 * m * (k + n)
                row[f"int{bits}_ms"] = round(t, 4)
                row[f"int{bits}_vs_fp16"] = round(t16 / t, 2)
                row[f"int{bits}_bw_share"] = round(moved / (t / 1e3) / 1e9 / copy_gb_s, 3)
            rows.append(row)
    return rows


def prefill_row(cuda_time, m: int = 512, k: int = 3072, n: int = 16384) -> dict:
    w16 = torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    codes, scales = _weights(k, n, 4)
    t16 = cuda_time(lambda: x @ w16, inner=10)
    ours = cuda_time(lambda: weight_only_gemm(x, codes, scales, None, 4, GROUP), inner=10)
    deq = cuda_time(lambda: x @ cuda_dequantize(codes, scales, 4, GROUP, torch.float16), inner=10)
    return {"m": m, "k": k, "n": n, "cublas_fp16_ms": round(t16, 4), "ours_int4_ms": round(ours, 4),
            "dequant_then_cublas_ms": round(deq, 4), "ours_vs_fp16": round(t16 / ours, 2),
            "ours_vs_dequant_cublas": round(deq / ours, 2)}


def weight_bytes_per_token(decoder) -> int:
    """Bytes a decode step reads: every parameter and weight-only buffer once (codes, scales), the tied
    embedding as the head, not the lookup's row."""
    total = sum(p.numel() * p.element_size() for name, p in decoder.named_parameters() if name != "embed.weight")
    total += sum(b.numel() * b.element_size() for _, b in decoder.named_buffers())
    return total + decoder.embed.weight.numel() * decoder.embed.weight.element_size()


def weight_only_e2e(decoder, prompt, ours_decode, copy_gb_s: float, fp16_tok_s: float) -> list[dict]:
    """Decode tok/s of a weight-only copy of ``decoder`` at INT8 then INT4, with the Orin projection."""
    orin = get_target("orin")
    rows = []
    for bits in (8, 4):
        wo = copy.deepcopy(decoder)
        record = quantize_linears(wo, bits)
        torch.cuda.synchronize()
        rate = ours_decode(wo, prompt, 128)
        wbytes = weight_bytes_per_token(wo)
        share = rate * wbytes / (copy_gb_s * 1e9)
        row = {"precision": f"int{bits}", "linears": record["linears"], "weight_bytes_per_token": wbytes,
               "decode_tok_s": round(rate, 1), "vs_fp16": round(rate / fp16_tok_s, 2),
               "bandwidth_share": round(share, 3),
               "orin_roofline_tok_s": round(orin.roofline_tok_s(wbytes), 1),
               "orin_projected_tok_s": round(orin.roofline_tok_s(wbytes) * share, 1),
               "edge_llm_orin_tok_s": EDGE_LLM_ORIN_TOK_S}
        rows.append(row)
        del wo
        torch.cuda.empty_cache()
    return rows


def render(r: dict) -> list[str]:
    lines = []
    if r.get("gemv"):
        lines += ["", "Weight-only GEMV (3B shapes; bandwidth share = bytes moved / time / copy bandwidth):", "",
                  "| shape | K x N | rows | cuBLAS fp16 ms (bw) | INT8 ms | INT8 vs fp16 | INT8 bw | INT4 ms | "
                  "INT4 vs fp16 | INT4 bw |", "|---|---|---|---|---|---|---|---|---|---|"]
        for g in r["gemv"]:
            lines.append(f"| {g['shape']} | {g['k']} x {g['n']} | {g['m']} | {g['cublas_fp16_ms']:.4f} "
                         f"({g['cublas_fp16_bw_share']:.0%}) | {g['int8_ms']:.4f} | {g['int8_vs_fp16']:.2f}x | "
                         f"{g['int8_bw_share']:.0%} | {g['int4_ms']:.4f} | {g['int4_vs_fp16']:.2f}x | "
                         f"{g['int4_bw_share']:.0%} |")
    if r.get("prefill_gemm"):
        p = r["prefill_gemm"]
        lines += ["", f"Prefill GEMM {p['m']} x {p['k']} x {p['n']} at INT4: ours {p['ours_int4_ms']:.3f} ms, cuBLAS "
                  f"fp16 {p['cublas_fp16_ms']:.3f} ms ({p['ours_vs_fp16']:.2f}x), dequantize + cuBLAS "
                  f"{p['dequant_then_cublas_ms']:.3f} ms ({p['ours_vs_dequant_cublas']:.2f}x)."]
    for w in r.get("weight_only_e2e", []):
        lines.append(f"- {w['precision']} decode: {w['decode_tok_s']} tok/s ({w['vs_fp16']:.2f}x fp16), "
                     f"{w['weight_bytes_per_token'] / 1e9:.2f} GB/token at {w['bandwidth_share']:.0%} of copy bandwidth; "
                     f"Orin AGX projection {w['orin_projected_tok_s']} tok/s (roofline {w['orin_roofline_tok_s']}; "
                     f"TensorRT-Edge-LLM publishes {w['edge_llm_orin_tok_s']} for Qwen2.5-3B W4A16)")
    return lines

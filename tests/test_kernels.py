"""kernels/ on a machine without a GPU: nvcc compiles them for every target, with no spills in the hot
kernels; and the fused-attention path of the canonical decoder (the torch op, whose CPU implementation is
the reference) gives the same logits as the model's own attention. The kernels themselves are checked
against the reference on a GPU: tests/gpu/test_kernels_cuda.py."""
import os
import shutil

import numpy as np
import pytest
import torch

from belle_edge.core.load import load_checkpoint
from belle_edge.mask import WINDOW_OFF, MaskConfig, retained
from belle_edge.models.decoder import Decoder, FusedInputs
from belle_edge.models.positions import rope_inv_freq
from belle_edge.ops.build import CI_ARCHS, HOT_KERNELS, compile_check
from belle_edge.paths import kernels_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_for_every_target_without_spills():
    out = os.path.join(ROOT, "kernels", "build", "ci")  # kept after the run: ptxas.log is the build log
    report = compile_check(CI_ARCHS, out_dir=out)
    hot = [k for k in report["kernels"] if any(h in k["name"] for h in HOT_KERNELS)]
    for arch in CI_ARCHS:
        names = " ".join(k["name"] for k in hot if k["arch"] == arch)
        assert all(h in names for h in HOT_KERNELS), f"sm_{arch}: hot kernels missing"
    spilling = [f"sm_{k['arch']} {k['name']}: {k['spill_bytes']} B" for k in hot if k["spill_bytes"]]
    assert not spilling, f"hot kernels spill registers (see {report['log']}): {spilling[:3]}"
    worst = max(hot, key=lambda k: k["registers"])
    print(f"{len(report['kernels'])} kernels compiled for {', '.join(f'sm_{a}' for a in CI_ARCHS)}; no spills in "
          f"{len(hot)} hot ones; most registers {worst['registers']} (sm_{worst['arch']}); log {report['log']}")


def test_kernel_sources_are_found():
    root = kernels_dir()
    assert os.path.isfile(os.path.join(root, "include", "belle_attention.h"))
    assert {"prefill.cu", "decode.cu", "write_kv.cu", "api.cu", "weight_only.cu"} <= set(os.listdir(os.path.join(root, "src")))
    assert os.path.isfile(os.path.join(root, "include", "belle_weight_only.h"))


def _fused_inputs(model, kpos, kturn, start, new, mask, capacity, norm_op=None):
    cfg = model.cfg
    k_pos = torch.zeros(1, capacity, dtype=torch.long)
    k_turn = torch.zeros(1, capacity, dtype=torch.long)
    k_pos[0, :len(kpos)] = torch.tensor(kpos)
    k_turn[0, :len(kturn)] = torch.tensor(kturn)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
    from belle_edge.ops.attention import dynamic_mask_attention

    return FusedInputs(op=dynamic_mask_attention, start=torch.tensor([start], dtype=torch.int32), q_pos=torch.tensor([kpos[start:]]),
                       q_turn=torch.tensor([kturn[start:]]), k_pos=k_pos, k_turn=k_turn,
                       window=torch.tensor([WINDOW_OFF if mask.window is None else mask.window]),
                       sinks=torch.tensor([mask.sinks]), inv_freq=inv_freq, max_keys=capacity, norm_op=norm_op)


@pytest.mark.parametrize("which,fused_norms", [("tiny_llama_dir", False), ("tiny_llama_dir", True),
                                                ("tiny_bloom_dir", False)])
def test_fused_attention_path_equals_the_models_attention(request, which, fused_norms):
    """Prefill chunks and decode steps over three turns with eviction: the op (RoPE/ALiBi, cache write,
    mask from the tables) must reproduce Attention's SDPA path; with ``fused_norms`` the layer boundaries
    go through belle::add_rms_norm (the residual carried as a pending delta) too."""
    from belle_edge.ops.norm import add_rms_norm

    ckpt = load_checkpoint(request.getfixturevalue(which))
    model = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    capacity, mask = 128, MaskConfig(window=1, sinks=2)
    caches = {"ref": model.new_caches(capacity), "fused": model.new_caches(capacity)}
    rng = np.random.default_rng(0)
    kpos, kturn, p, worst = [], [], 0, 0.0
    with torch.no_grad():
        for turn in (1, 2, 3):
            keep = np.flatnonzero(retained(np.array(kpos, dtype=np.int64), np.array(kturn, dtype=np.int64), turn, mask))
            for cs in caches.values():
                for c in cs:
                    c.keep(torch.as_tensor(keep))
            kpos, kturn = [kpos[i] for i in keep], [kturn[i] for i in keep]
            for size in (int(rng.integers(3, 12)), 1, 1, 1):
                ids = torch.as_tensor(rng.integers(0, ckpt.config.vocab_size, size))[None]
                start = len(kpos)
                kpos += list(range(p, p + size))
                kturn += [turn] * size
                p += size
                ref = model(ids, np.array(kpos[start:]), np.array(kturn[start:]), mask, caches=caches["ref"],
                            start=start, key_positions=np.array(kpos), key_turns=np.array(kturn))
                fused = model(ids, None, None, mask, caches=caches["fused"],
                              fused=_fused_inputs(model, kpos, kturn, start, size, mask, capacity,
                                                  add_rms_norm if fused_norms else None))
                worst = max(worst, (ref - fused).abs().max().item())
    assert worst < 1e-4, worst


def test_add_rms_norm_is_the_residual_add_then_the_models_norm():
    from belle_edge.ops.norm import add_rms_norm

    g = torch.Generator().manual_seed(0)
    x, delta, w = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g), torch.randn(64, generator=g)
    norm = torch.nn.RMSNorm(64, eps=1e-6)
    norm.weight.data.copy_(w)
    h, y = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(h, x + delta) and torch.allclose(y, norm(x + delta), atol=1e-6)
    h, y = add_rms_norm(x, None, w, 1e-6)
    assert torch.equal(h, x) and h.data_ptr() != x.data_ptr() and torch.allclose(y, norm(x), atol=1e-6)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_the_ctypes_bindings_match_the_c_structs():
    """The library loads without a GPU, and its host-side functions (sizes, parameter checks) see the fields
    the Python structs set: a field out of place would give other sizes or other refusals."""
    import ctypes

    from belle_edge.ops import norm, weight_only
    from belle_edge.ops.build import build_library

    lib = ctypes.CDLL(build_library((80,)))  # cached by the sources' hash
    weight_only.bind(lib)
    norm.bind(lib)
    p = weight_only.Params(dtype=0, bits=4, m=4, n=300, k=256, group=128)
    assert lib.belle_weight_only_workspace_size(ctypes.byref(p)) == 16 * 4 * 300 * 4  # 16 splits at most
    assert lib.belle_weight_only_counters_size(ctypes.byref(p)) == 3 * 4  # one per 128 columns
    p.m = 9
    assert lib.belle_weight_only_workspace_size(ctypes.byref(p)) == 0  # the prefill path splits nothing
    codes = ctypes.create_string_buffer(64)
    aligned = ctypes.addressof(codes) + (-ctypes.addressof(codes)) % 16
    p = weight_only.Params(dtype=0, bits=5, m=1, n=32, k=128, group=128, x=aligned, codes=aligned, scales=aligned,
                           y=aligned, x_stride=128, y_stride=32)
    assert lib.belle_weight_only_error_string(lib.belle_weight_only_gemm(ctypes.byref(p), None)) == b"bits must be 4 or 8"
    p.bits, p.group = 4, 96
    assert b"multiple of 64" in lib.belle_weight_only_error_string(lib.belle_weight_only_gemm(ctypes.byref(p), None))
    p.group, p.n = 128, 40
    assert b"multiple of 32" in lib.belle_weight_only_error_string(lib.belle_weight_only_gemm(ctypes.byref(p), None))
    q = norm.Params(dtype=0, rows=1, width=20, eps=1e-6, x=aligned, weight=aligned, x_out=aligned, y=aligned)
    assert b"multiple of 8" in lib.belle_rms_norm_error_string(lib.belle_add_rms_norm(ctypes.byref(q), None))
    q.dtype = 7
    assert b"BELLE_FP16" in lib.belle_rms_norm_error_string(lib.belle_add_rms_norm(ctypes.byref(q), None))

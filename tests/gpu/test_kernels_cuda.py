"""The CUDA kernels against the reference attention, and the torch backend's fused path against the reference.

Random dialogue layouts (turn lengths, evicted turns, prefill chunks that span several turns, decode, a
block of pinned notes: turn-0 tokens mid-dialogue, whose queries must not see the later turns before them),
window/sink settings, head dims 64/128, GQA ratios 1-8, RoPE and ALiBi, fp16 and bf16. The reference
(``belle_edge.ops.attention.reference_attention``) computes fp32 scores over the same rounded inputs and
asks ``belle_edge.mask.visible``. Tolerance |out - ref| <= atol + rtol * |ref|: fp16 3e-3 + 4e-3 |ref|,
bf16 2.5e-2 + 2e-2 |ref| (the kernels round the softmax weights to the dtype before P.V, as flash attention
does, and the output to the dtype at the end).
"""
import numpy as np
import pytest
import torch

from belle_edge.mask import WINDOW_OFF, MaskConfig, retained

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

TOL = {torch.float16: (3e-3, 4e-3), torch.bfloat16: (2.5e-2, 2e-2)}  # (atol, rtol)


def _kernels():
    from belle_edge.ops.attention import kernels_available

    ok, why = kernels_available()
    if not ok:
        pytest.fail(f"CUDA is here but the kernels are not: {why}")


def dialogue_layout(rng, mask: MaskConfig, *, decode: bool, evict: bool, notes: bool = False):
    """(key positions, key turns, number of new tokens): a dialogue's cache after eviction, then new tokens
    (one for decode; for prefill the rest of the current turn, sometimes several whole turns). ``notes``: a
    block of turn-0 tokens placed at the start of a later turn, as ChatSession places pinned notes."""
    lengths = [int(rng.integers(0, 20))] + [int(rng.integers(1, 160)) for _ in range(int(rng.integers(1, 9)))]
    turn = np.repeat(np.arange(len(lengths)), lengths)
    if notes and len(lengths) > 2:
        at = int(np.flatnonzero(turn == int(rng.integers(2, len(lengths))))[0])
        turn = np.concatenate([turn[:at], np.zeros(int(rng.integers(4, 40)), turn.dtype), turn[at:]])
    pos = np.arange(len(turn))
    if decode:
        new = 1
    else:
        first_new_turn = int(rng.integers(1, len(lengths)))
        new = int((turn >= first_new_turn).sum())
        if new < 2:
            new = min(2, len(pos))
    cur = int(turn[len(pos) - new])
    past = slice(0, len(pos) - new)
    keep = np.ones(len(pos), bool)
    if evict and mask.enabled:
        keep[past] = retained(pos[past], turn[past], cur, mask)
    return pos[keep], turn[keep], new


def _case(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.choice([64, 128]))
    dtype = [torch.float16, torch.bfloat16][seed % 2]
    group = int(rng.choice([1, 2, 3, 4, 7, 8]))  # 7: Qwen2.5-0.5B (14 query heads over 2)
    hkv = int(rng.choice([1, 2]))
    window = [None, 0, 1, 3][int(rng.integers(0, 4))]
    sinks = int(rng.choice([0, 4]))
    mask = MaskConfig(window=window, sinks=sinks) if window is not None else MaskConfig.off()
    return rng, d, dtype, group, hkv, mask


def _run(seed, *, decode, evict, batch=1, notes=False):
    from belle_edge.ops.attention import dynamic_mask_attention, reference_attention

    rng, d, dtype, group, hkv, mask = _case(seed)
    rope, alibi = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    kpos, kturn, t = dialogue_layout(rng, mask, decode=decode, evict=evict, notes=notes)
    n = len(kpos)
    start = n - t
    cap = n + int(rng.integers(0, 40))
    h = hkv * group
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=dev).to(dtype)  # noqa: E731
    q, k, v = rand(batch, h, t, d), rand(batch, hkv, t, d), rand(batch, hkv, t, d)
    kc, vc = rand(batch, hkv, cap, d), rand(batch, hkv, cap, d)
    kc2, vc2 = kc.clone(), vc.clone()
    table = lambda a: torch.as_tensor(np.asarray(a), device=dev).expand(batch, -1).contiguous()  # noqa: E731
    args = dict(start=torch.tensor([start], dtype=torch.int32, device=dev),
                q_pos=table(kpos[start:]), q_turn=table(kturn[start:]), k_pos=table(kpos), k_turn=table(kturn),
                window=torch.tensor([WINDOW_OFF if mask.window is None else mask.window], device=dev),
                sinks=torch.tensor([mask.sinks], device=dev),
                alibi_slopes=(torch.rand(h, generator=g, device=dev) * 0.5).to(dtype) if alibi else None,
                rope_inv_freq=(1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d)) if rope else None,
                scale=d ** -0.5, max_keys=cap)
    got = dynamic_mask_attention(q, k, v, kc, vc, **args)
    ref = reference_attention(q, k, v, kc2, vc2, **args)
    torch.cuda.synchronize()
    diff = (got.float() - ref.float()).abs()
    err = diff.max().item()
    atol, rtol = TOL[dtype]
    excess = (diff - (atol + rtol * ref.float().abs())).max().item()
    cache_err = max((kc.float() - kc2.float()).abs().max().item(), (vc.float() - vc2.float()).abs().max().item())
    label = (f"seed={seed} {'decode' if decode else 'prefill'} T={t} keys={n} D={d} G={group} Hkv={hkv} B={batch} "
             f"W={mask.window} S={mask.sinks} rope={rope} alibi={alibi} {str(dtype)[6:]}")
    print(f"{label}: max|out-ref|={err:.2e} max|cache-ref|={cache_err:.2e}")
    assert excess <= 0, label
    assert cache_err <= 4 * atol, label  # RoPE'd keys: sincosf vs torch.cos, then one rounding


@pytest.mark.parametrize("seed", range(24))
def test_prefill_matches_reference(seed):
    _kernels()
    _run(seed, decode=False, evict=seed % 3 != 0, batch=1 + (seed // 2) % 2)


@pytest.mark.parametrize("seed", range(24))
def test_decode_matches_reference(seed):
    _kernels()
    _run(100 + seed, decode=True, evict=seed % 3 != 0, batch=1 + (seed // 2) % 2)


@pytest.mark.parametrize("seed", range(12))
def test_pinned_notes_mid_dialogue_match_reference(seed):
    _kernels()
    _run(200 + seed, decode=seed % 2 == 1, evict=True, batch=1 + seed % 2, notes=True)


def _tiny_decoder(positions, dtype, head_dim=64):
    from belle_edge.models.config import ModelConfig
    from belle_edge.models.decoder import Decoder

    cfg = ModelConfig(family="llama" if positions == "rope" else "bloom", vocab_size=512, hidden_size=256,
                      num_layers=2, num_heads=4 if positions == "rope" else 4, num_kv_heads=2 if positions == "rope" else 4,
                      head_dim=head_dim, intermediate_size=512, max_positions=4096, norm_eps=1e-5,
                      norm="rms" if positions == "rope" else "layer", mlp="swiglu" if positions == "rope" else "gelu",
                      positions=positions, embed_norm=positions == "alibi")
    torch.manual_seed(0)
    model = Decoder(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("positions", ["rope", "alibi"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backend_with_cuda_graphs_matches_reference_backend(positions, dtype):
    """A multi-turn exchange (prefill chunks, decode steps, an eviction) through both backends."""
    from belle_edge.runtime.backends.torch_backend import TorchBackend

    _kernels()
    model = _tiny_decoder(positions, dtype)
    fused = TorchBackend(model, 512, fused=True, cuda_graphs=True)
    plain = TorchBackend(model, 512, fused=False)
    assert fused.fused and not plain.fused
    mask = MaskConfig(window=1, sinks=4)
    rng = np.random.default_rng(1)
    kpos, kturn, p = [], [], 0
    worst, scale = 0.0, 0.0
    for turn in range(1, 6):
        if turn > 1:  # the session's eviction, as ChatSession does it
            keep = np.flatnonzero(retained(np.array(kpos), np.array(kturn), turn, mask))
            for backend in (fused, plain):
                backend.keep(keep)
            kpos, kturn = [kpos[i] for i in keep], [kturn[i] for i in keep]
        chunks = [int(rng.integers(2, 40))] + [1] * 6  # a user message, then decode steps
        for size in chunks:
            ids = rng.integers(0, 512, size)
            new_pos, new_turn = list(range(p, p + size)), [turn] * size
            kpos += new_pos
            kturn += new_turn
            outs = [b.forward(ids, np.array(new_pos), np.array(new_turn), mask=mask) for b in (fused, plain)]
            assert all((b.keys.positions == np.array(kpos)).all() for b in (fused, plain))
            worst = max(worst, float(np.abs(outs[0] - outs[1]).max()))
            scale = max(scale, float(np.abs(outs[1]).max()))
            p += size
    print(f"fused+graphs vs reference backend, {positions} {str(dtype)[6:]}: max |logits diff| = {worst:.2e} "
          f"(max |logits| {scale:.2f})")
    assert fused._graph is not None  # decode steps really replayed the captured graph
    assert worst < (0.01 if dtype == torch.float16 else 0.05) * max(scale, 1.0)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_the_batched_pool_on_the_kernels_matches_its_reference_path(positions):
    """The torch pool's CUDA path (runtime/backends/torch_pool.py): ragged rows decoded together through the
    fused op over the whole pool, against the same pool on the reference attention."""
    from belle_edge.runtime.backends.torch_pool import TorchPool

    _kernels()
    model = _tiny_decoder(positions, torch.float16)
    fused, plain = TorchPool(model, 4, 256), TorchPool(model, 4, 256, fused=False)
    assert fused.fused and not plain.fused
    mask = MaskConfig(window=1, sinks=2)
    rng = np.random.default_rng(2)
    prompts = {0: rng.integers(0, 512, 30), 1: rng.integers(0, 512, 7), 3: rng.integers(0, 512, 61)}
    worst, scale = 0.0, 0.0
    for slot, ids in prompts.items():
        outs = [p.forward_rows([(slot, ids, np.arange(len(ids)), np.ones(len(ids), np.int64))], mask=mask)
                for p in (fused, plain)]
        worst, scale = max(worst, float(np.abs(outs[0] - outs[1]).max())), max(scale, float(np.abs(outs[1]).max()))
    for step in range(8):
        rows = [(s, rng.integers(0, 512, 1), np.array([len(ids) + step]), np.array([1])) for s, ids in prompts.items()]
        outs = [p.forward_rows(rows, mask=mask) for p in (fused, plain)]
        worst, scale = max(worst, float(np.abs(outs[0] - outs[1]).max())), max(scale, float(np.abs(outs[1]).max()))
    print(f"batched pool, kernels vs reference, {positions}: max |logits diff| = {worst:.2e} (max |logits| {scale:.2f})")
    assert worst < 0.01 * max(scale, 1.0)

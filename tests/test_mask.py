"""The one definition of the turn-window mask, and the model's attention against it."""
import numpy as np
import pytest
import torch

from belle_edge.errors import InputError
from belle_edge.mask import MaskConfig, retained, visible
from belle_edge.models.decoder import Decoder


def random_layout(rng, n_turns=7, system=3, max_len=6):
    turns = [0] * system
    for t in range(1, n_turns + 1):
        turns += [t] * int(rng.integers(1, max_len + 1))
    turns = np.array(turns)
    return np.arange(len(turns)), turns


def test_mask_rule_on_a_written_out_layout():
    # system (2 tokens) | turn 1 (2) | turn 2 (2) | turn 3 (2); W=1, S=3
    pos = np.arange(8)
    turn = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    m = visible(pos[:, None], turn[:, None], pos[None, :], turn[None, :], MaskConfig(window=1, sinks=3))
    # a query of turn 3 sees: system (0, 1), sink position 2 (turn 1), turn 2, itself causally
    assert m[6].tolist() == [True, True, True, False, True, True, True, False]
    assert m[7].tolist() == [True, True, True, False, True, True, True, True]
    # turn 2 still sees all of turn 1 (2 - 1 <= W)
    assert m[5].tolist() == [True] * 6 + [False, False]


def test_mask_off_is_plain_causal():
    pos, turn = random_layout(np.random.default_rng(0))
    m = visible(pos[:, None], turn[:, None], pos[None, :], turn[None, :], MaskConfig.off())
    assert (m == np.tril(np.ones((len(pos), len(pos)), dtype=bool))).all()


@pytest.mark.parametrize("window,sinks", [(0, 0), (1, 4), (3, 4), (2, 0)])
def test_mask_numpy_and_torch_give_the_same_answer(window, sinks):
    pos, turn = random_layout(np.random.default_rng(window * 10 + sinks))
    cfg = MaskConfig(window=window, sinks=sinks)
    a = visible(pos[:, None], turn[:, None], pos[None, :], turn[None, :], cfg)
    tp, tt = torch.from_numpy(pos), torch.from_numpy(turn)
    b = visible(tp[:, None], tt[:, None], tp[None, :], tt[None, :], cfg).numpy()
    assert (a == b).all()


def test_retained_keys_are_exactly_those_later_queries_can_see():
    pos, turn = random_layout(np.random.default_rng(1), n_turns=9)
    cfg = MaskConfig(window=2, sinks=4)
    current = int(turn.max())
    keep = retained(pos, turn, current, cfg)
    # any query of the current turn or later, at any later position
    for q_turn in (current, current + 1, current + 5):
        seen = visible(10_000, q_turn, pos, turn, cfg)
        assert not (seen & ~keep).any(), "a query could see an evicted key"
    assert (keep == visible(10_000, current, pos, turn, cfg)).all()


def test_mask_config_rejects_bad_values():
    with pytest.raises(InputError, match="window"):
        MaskConfig(window=-1)
    with pytest.raises(InputError, match="sinks"):
        MaskConfig(sinks=-2)


def _tiny_decoder(family, layers, seed=0):
    from belle_edge.models.config import ModelConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=48, num_layers=layers, head_dim=12, intermediate_size=64,
                  max_positions=256, norm_eps=1e-5)
    if family == "llama":
        cfg = ModelConfig(family="llama", num_heads=4, num_kv_heads=2, norm="rms", mlp="swiglu", positions="rope",
                          tie_embeddings=False, **common)
    else:
        cfg = ModelConfig(family="bloom", num_heads=4, num_kv_heads=4, norm="layer", mlp="gelu", positions="alibi",
                          embed_norm=True, attention_bias=True, mlp_bias=True, **common)
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.3 if "norm" not in name else 0.05)
        if "norm" in name and name.endswith("weight"):
            p.data += 1
    if cfg.positions == "alibi":
        from belle_edge.models.positions import alibi_slopes

        for layer in model.layers:
            layer.attn.alibi_slopes.copy_(alibi_slopes(cfg.num_heads))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_masked_attention_equals_explicit_masked_softmax(family):
    model = _tiny_decoder(family, layers=1)
    attn = model.layers[0].attn
    cfg = model.cfg
    rng = np.random.default_rng(2)
    pos, turn = random_layout(rng)
    mask = MaskConfig(window=2, sinks=2)
    x = torch.randn(1, len(pos), cfg.hidden_size)
    allowed = torch.from_numpy(visible(pos[:, None], turn[:, None], pos[None, :], turn[None, :], mask))
    rel = torch.from_numpy(pos[None, :] - pos[:, None]).float()
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    from belle_edge.models.positions import apply_rope, rope_tables

    rope = rope_tables(torch.from_numpy(pos), cfg.head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
    with torch.no_grad():  # the attention takes a batch of tables: (1, T, K), rope (1, 1, T, D)
        got = attn(x, bias[None], rel[None], rope and tuple(r[None, None] for r in rope), None, 0)
        # reference: repeat K/V per query head, scores, explicit -inf outside the mask, softmax, weighted sum
        t = len(pos)
        q = attn.q_proj(x).view(1, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.repeat_interleave(cfg.group_size, dim=1)
        v = v.repeat_interleave(cfg.group_size, dim=1)
        scores = q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5
        if cfg.positions == "alibi":
            scores = scores + attn.alibi_slopes[:, None, None] * rel
        scores = scores.masked_fill(~allowed, float("-inf"))
        ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, -1))
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_tokens_outside_a_querys_window_do_not_change_its_logits(family):
    # One layer: with more, a token outside the window still reaches the query through tokens inside it that
    # saw it earlier (as in any sliding window); the runtime's cache keeps exactly that, see test_session.
    model = _tiny_decoder(family, layers=1)
    mask = MaskConfig(window=1, sinks=2)
    rng = np.random.default_rng(3)
    for _ in range(5):
        pos, turn = random_layout(rng, n_turns=5)
        ids = torch.from_numpy(rng.integers(0, 97, size=(1, len(pos))))
        q = len(pos) - 1
        seen = visible(pos[q], turn[q], pos, turn, mask)
        with torch.no_grad():
            base = model(ids, pos, turn, mask)[0, q]
            outside = np.flatnonzero(~seen)
            inside = np.flatnonzero(seen[:q])
            assert len(outside) and len(inside)
            for k, expect_change in ((rng.choice(outside), False), (rng.choice(inside), True)):
                changed = ids.clone()
                changed[0, k] = (changed[0, k] + 1) % 97
                logits = model(changed, pos, turn, mask)[0, q]
                moved = (logits - base).abs().max().item()
                assert (moved > 1e-4) == expect_change, (k, moved)

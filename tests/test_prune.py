"""Structured pruning on tiny random LLaMA (GQA) and BLOOM checkpoints: the plan's shapes and parameter
count, the written checkpoint reloaded by stock transformers, our canonical model agreeing with
transformers' on it, the cut itself against a masked source model, the importance measures, and the errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import CORPUS, make_tiny_llama, make_tiny_qwen2  # noqa: E402

from belle_edge.errors import BelleEdgeError, InputError  # noqa: E402
from belle_edge.mask import MaskConfig  # noqa: E402

CALIBRATION = tuple(dict.fromkeys(CORPUS))  # the six distinct lines


def _make_bloom(path, tokenizer, *, layers=4, heads=2, head_dim=64):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(1)
    cfg = BloomConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=heads * head_dim, n_layer=layers,
                      n_head=heads, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    BloomForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("prune_src")
    llama, bloom, qwen2 = str(root / "llama"), str(root / "bloom"), str(root / "qwen2")
    make_tiny_llama(llama, tiny_tokenizer, layers=4)  # 4 query heads over 2 KV heads
    _make_bloom(bloom, tiny_tokenizer)
    make_tiny_qwen2(qwen2, tiny_tokenizer, layers=4)  # q/k/v biases follow their rows, a tied head
    return {"llama": llama, "bloom": bloom, "qwen2": qwen2}


def _logits(model, ids):
    return model(torch.tensor(ids)[None], np.arange(len(ids)), np.zeros(len(ids), np.int64), MaskConfig.off())[0]


def _prune(src, mode, ratio=0.6, **kw):
    from belle_edge.core.load import load_checkpoint
    from belle_edge.compile.prune.prune import PruneRequest, prune_checkpoint

    ckpt = load_checkpoint(src)
    lines = []
    result = prune_checkpoint(ckpt, PruneRequest(ratio=ratio, mode=mode, calibration=CALIBRATION * 4,
                                                 calibration_tokens=1024, **kw), log=lines.append)
    return ckpt, result, "\n".join(lines)


@pytest.mark.parametrize("family", ["llama", "bloom", "qwen2"])
@pytest.mark.parametrize("mode", ["width", "depth", "mix"])
def test_pruned_checkpoint_reloads_in_transformers_and_matches_our_model(sources, tmp_path, family, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.compile.prune.plan import count_params
    from belle_edge.core.save import save_checkpoint

    # mix keeps the tokens of two English lines: the Chinese ones must then fall back to byte tokens
    extra = {"vocab_corpus": CALIBRATION[3:5]} if mode == "mix" else {}
    src_ckpt, result, printed = _prune(sources[family], mode, **extra)
    plan = result.plan
    assert "prune plan" in printed and "parameters:" in printed
    out = save_checkpoint(result.checkpoint, str(tmp_path / "pruned"),
                          records={"pruning.json": result.record}, tokenizer_config=result.tokenizer_config)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == plan.params_after == count_params(result.checkpoint.config)
    assert n_hf < count_params(src_ckpt.config)
    if mode == "depth":  # whole layers: within half a layer of the target
        per_layer = count_params(src_ckpt.config.replace(num_layers=2)) - count_params(
            src_ckpt.config.replace(num_layers=1))
        assert abs(n_hf - plan.target) <= per_layer / 2 + 1
        assert plan.shape.layers < src_ckpt.config.num_layers
    else:
        assert abs(n_hf / plan.target - 1) <= 0.02, (n_hf, plan.target)
        assert plan.shape.hidden < src_ckpt.config.hidden_size
    if mode == "mix":
        assert plan.shape.vocab < src_ckpt.config.vocab_size  # the corpus uses a part of the 400 tokens
    cfg = result.checkpoint.config
    assert hf.config.hidden_size == cfg.hidden_size and hf.config.num_hidden_layers == cfg.num_layers
    assert hf.config.vocab_size == cfg.vocab_size
    if family in ("llama", "qwen2"):
        assert cfg.hidden_size % cfg.num_heads == 0  # transformers' LlamaConfig insists
        assert hf.config.num_key_value_heads == cfg.num_kv_heads
        assert hf.config.intermediate_size == cfg.intermediate_size
    else:
        assert hf.config.n_head == src_ckpt.config.num_heads  # every head (and its ALiBi slope) stays

    ours = load_checkpoint(out)
    model = Decoder.from_state_dict(ours.config, ours.state_dict)
    text = CALIBRATION[0] + " Zebra 斑马 🦓"  # partly outside a trimmed vocabulary
    ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
    assert ours.tokenizer.decode(ids) == text
    assert AutoTokenizer.from_pretrained(out).decode(ids) == text
    with torch.no_grad():
        want = hf(torch.tensor(ids)[None]).logits[0]
        got = _logits(model, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    record = json.load(open(os.path.join(out, "pruning.json")))
    assert record["plan"]["params_after"] == n_hf and record["plan"]["mode"] == mode


def _masked_source_logits(ckpt, sel, ids):
    """The source model with everything the selection drops zeroed where it enters the residual stream."""
    from belle_edge.models.decoder import Decoder

    sd = {k: v.clone() for k, v in ckpt.state_dict.items()}
    cfg, d = ckpt.config, ckpt.config.head_dim
    for i in range(cfg.num_layers):
        if i in sel.mlp:
            drop = torch.ones(cfg.intermediate_size, dtype=torch.bool)
            drop[sel.mlp[i]] = False
            sd[f"layers.{i}.mlp.down_proj.weight"][:, drop] = 0
        if i in sel.q_heads:
            drop = torch.ones(cfg.num_heads, dtype=torch.bool)
            drop[sel.q_heads[i]] = False
            sd[f"layers.{i}.attn.o_proj.weight"].view(-1, cfg.num_heads, d)[:, drop] = 0
        if i in sel.v_dims:
            for name, dims in (("o_proj", sel.v_dims[i]), ("q_proj", sel.qk_dims[i])):
                drop = torch.ones(cfg.num_heads, d, dtype=torch.bool)
                drop[torch.arange(cfg.num_heads)[:, None], dims] = False
                w = sd[f"layers.{i}.attn.{name}.weight"]
                if name == "o_proj":
                    w.view(-1, cfg.num_heads, d)[:, drop] = 0
                else:
                    w.view(cfg.num_heads, d, -1)[drop] = 0
                    sd[f"layers.{i}.attn.q_proj.bias"].view(cfg.num_heads, d)[drop] = 0
    with torch.no_grad():
        return _logits(Decoder.from_state_dict(cfg, sd), ids)


@pytest.mark.parametrize("family", ["llama", "bloom", "qwen2"])
def test_cutting_heads_and_channels_equals_zeroing_them_in_the_source(sources, family):
    """Keep the residual stream whole and the cut is exact: the pruned model computes what the source
    computes with the dropped heads, head dims and MLP channels silenced."""
    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.compile.prune.calibration import calibration_ids, collect_stats
    from belle_edge.compile.prune.plan import Plan, count_params, width_shape
    from belle_edge.compile.prune.prune import select
    from belle_edge.compile.prune.slicing import slice_model

    ckpt = load_checkpoint(sources[family])
    cfg = ckpt.config
    teacher = Decoder.from_state_dict(cfg, ckpt.state_dict)
    stats = collect_stats(teacher, calibration_ids(ckpt.tokenizer, list(CALIBRATION), tokens=512))
    shape = width_shape(cfg, 0.5, vocab=cfg.vocab_size, layers=cfg.num_layers, multiple=8)
    shape = type(shape)(**{**shape.__dict__, "hidden": cfg.hidden_size})  # keep the stream whole
    if family == "bloom":
        assert shape.head_dim < cfg.head_dim and shape.kv_heads * shape.group == cfg.num_heads
        shape = type(shape)(**{**shape.__dict__, "intermediate": cfg.intermediate_size // 2})
    else:
        assert shape.kv_heads * shape.group < cfg.num_heads
    plan = Plan("width", cfg, shape, 1, count_params(cfg), 0)
    sel = select(plan, stats, None)
    pruned = Decoder.from_state_dict(plan.config, slice_model(cfg, ckpt.state_dict, sel, plan.config))
    ids = ckpt.tokenizer.encode(CALIBRATION[1]).ids
    with torch.no_grad():
        got = _logits(pruned, ids)
    want = _masked_source_logits(ckpt, sel, ids)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    if family in ("llama", "qwen2"):  # query heads stay with their KV head: each kept group is whole or cut evenly
        for i, q in sel.q_heads.items():
            groups = (q // cfg.group_size).view(shape.kv_heads, shape.group)
            assert (groups == sel.kv_heads[i][:, None]).all()
    else:
        for i in range(cfg.num_layers):  # ALiBi: the slopes of every head are the source's
            assert torch.equal(pruned.layers[i].attn.alibi_slopes, teacher.layers[i].attn.alibi_slopes)


def test_importance_comes_from_activations(sources):
    """A silenced MLP channel ranks last however large its weights; an identity layer has no influence and is
    the one depth pruning drops."""
    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.compile.prune.calibration import calibration_ids, collect_stats
    from belle_edge.compile.prune.plan import solve
    from belle_edge.compile.prune.prune import select

    ckpt = load_checkpoint(sources["llama"])
    sd = {k: v.clone() for k, v in ckpt.state_dict.items()}
    sd["layers.0.mlp.up_proj.weight"][5] = 0  # channel 5 never fires...
    sd["layers.0.mlp.down_proj.weight"][:, 5] *= 100  # ...though its output weights are the largest
    sd["layers.2.attn.o_proj.weight"][:] = 0  # layer 2 adds nothing to the stream
    sd["layers.2.mlp.down_proj.weight"][:] = 0
    stats = collect_stats(Decoder.from_state_dict(ckpt.config, sd),
                          calibration_ids(ckpt.tokenizer, list(CALIBRATION), tokens=512))
    assert int(stats.mlp[0].argmin()) == 5
    assert stats.block_influence[2] < 1e-6 < min(b for i, b in enumerate(stats.block_influence) if i != 2)
    plan = solve(ckpt.config, int(0.8 * sum(v.numel() for v in sd.values())), "depth")[0]
    assert 2 not in select(plan, stats, None).layers


def test_residual_and_mlp_groups_match_torch_pruning_trace():
    """The coupled dimensions declared in slicing.py are the ones torch-pruning's DependencyGraph traces."""
    tp = pytest.importorskip("torch_pruning")
    from belle_edge.models.config import ModelConfig
    from belle_edge.models.decoder import Decoder
    from belle_edge.compile.prune.slicing import Selection, slice_model

    cfg = ModelConfig(family="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, max_positions=64, norm_eps=1e-5, norm="rms", mlp="swiglu",
                      positions="rope", tie_embeddings=False)
    model = Decoder(cfg)
    norms = [(p, 0) for n, p in model.named_parameters() if "norm" in n]  # nn.RMSNorm: one value per channel
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, 4, dtype=torch.long), unwrapped_parameters=norms,
        forward_fn=lambda m, x: m(x, np.arange(4), np.zeros(4, np.int64), MaskConfig.off()))

    def traced(module, fn):
        group = dg.get_pruning_group(module, fn, idxs=[0, 1])
        mods = {dep.target.module for dep, _ in group}
        return {name for name, m in model.named_modules() if m in mods and name}

    def declared(sel, new_cfg):
        cut = slice_model(cfg, model.state_dict(), sel, new_cfg)
        return {k.rpartition(".")[0] for k, v in model.state_dict().items()
                if k.endswith("weight") and cut[k].shape != v.shape and "norm" not in k}

    keep = torch.arange(2, 32)
    assert traced(model.embed, tp.prune_embedding_out_channels) == declared(
        Selection(hidden=keep), cfg.replace(hidden_size=30))
    keep = torch.arange(2, 48)
    assert traced(model.layers[1].mlp.down_proj, tp.prune_linear_in_channels) == declared(
        Selection(mlp={1: keep}), cfg) == {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}


def test_bad_budgets_and_inputs_are_one_line_errors(sources, tmp_path):
    from belle_edge.core.load import load_checkpoint
    from belle_edge.compile.prune.calibration import calibration_ids
    from belle_edge.compile.prune.plan import count_params, solve
    from belle_edge.compile.prune.prune import PruneRequest

    ckpt = load_checkpoint(sources["llama"])
    n = count_params(ckpt.config)
    cases = [lambda: solve(ckpt.config, n, "width"), lambda: solve(ckpt.config, n * 2, "mix"),
             lambda: solve(ckpt.config, 1000, "depth"), lambda: solve(ckpt.config, 1000, "width"),
             lambda: solve(ckpt.config, n // 2, "sideways"),
             lambda: PruneRequest(ratio=1.5), lambda: PruneRequest(), lambda: PruneRequest(ratio=0.5, target_params=9),
             lambda: calibration_ids(ckpt.tokenizer, ["", ""], tokens=64)]
    for case in cases:
        with pytest.raises(BelleEdgeError) as e:
            case()
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not below the model"):
        solve(ckpt.config, n, "width")
    with pytest.raises(InputError, match="too small for depth pruning: one layer"):
        solve(ckpt.config, 1000, "depth")
    with pytest.raises(InputError, match="tokenizes to nothing"):
        calibration_ids(ckpt.tokenizer, [""], tokens=64)


def test_llama_plans_keep_hidden_a_multiple_of_the_heads():
    """transformers refuses a LLaMA config whose hidden size is not a multiple of its head count."""
    from belle_edge.models.config import ModelConfig
    from belle_edge.compile.prune.plan import count_params, solve

    cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=4096, num_layers=4, num_heads=32,
                      num_kv_heads=8, head_dim=128, intermediate_size=11008, max_positions=4096, norm_eps=1e-5,
                      norm="rms", mlp="swiglu", positions="rope", tie_embeddings=False)
    full = count_params(cfg)
    for ratio in np.linspace(0.3, 0.9, 13):
        for plan in solve(cfg, int(ratio * full), "width"):
            assert plan.shape.hidden % (plan.shape.kv_heads * plan.shape.group) == 0, (ratio, plan.shape)
            assert abs(plan.deviation) <= 0.02, (ratio, plan.deviation)


def test_fidelity_handles_any_token_count(sources):
    from belle_edge.core.load import load_checkpoint
    from belle_edge.core.fidelity import measure
    from belle_edge.models.decoder import Decoder

    ckpt = load_checkpoint(sources["llama"])
    model = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    for tokens in (9, 10, 12):  # 9 = 2 x 4 + 1: a one-token last chunk
        r = measure(model, ckpt.tokenizer, model, ckpt.tokenizer, texts={"t": CALIBRATION[0] * 3}, tokens=tokens,
                    seq=4)["texts"]["t"]
        assert r["kl_mean"] < 1e-9 and r["ppl_ratio"] == 1.0


def _cli(*args):
    from belle_edge.cli import main

    return main(list(args))


def test_cli_prune_then_eval_fidelity(sources, tmp_path, capsys):
    out = str(tmp_path / "p")
    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(CALIBRATION * 3), encoding="utf-8")
    assert _cli("prune", sources["llama"], "--ratio", "0.6", "--mode", "width", "--calibration", str(cal),
                "--out", out) == 0
    printed = capsys.readouterr().out
    assert "prune plan (width)" in printed and "wrote" in printed
    record = json.load(open(os.path.join(out, "pruning.json")))
    assert record["teacher"]["path"] == os.path.abspath(sources["llama"])
    assert {"en:pydoc_data.topics(odd)", "zh:zh_held_out.txt"} <= set(record["fidelity"]["texts"])
    assert _cli("eval-fidelity", out, "--tokens", "64", "--json") == 0  # teacher from pruning.json
    result = json.loads(capsys.readouterr().out)
    for r in result["texts"].values():
        assert r["kl_mean"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["ppl_ratio"] > 0
    # a model against itself: no divergence, full agreement, the same perplexity
    assert _cli("eval-fidelity", sources["llama"], "--teacher", sources["llama"], "--tokens", "64", "--json") == 0
    same = json.loads(capsys.readouterr().out)
    for r in same["texts"].values():
        assert abs(r["kl_mean"]) < 1e-6 and r["top1_agreement"] == 1.0 and r["ppl_ratio"] == 1.0
    # refusals: one line, exit 2, nothing written
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    x = str(tmp_path / "x")
    for argv in (["prune", sources["llama"], "--ratio", "0.5", "--calibration", str(empty), "--out", x],
                 ["prune", sources["llama"], "--ratio", "2", "--out", str(tmp_path / "x")],
                 ["prune", sources["llama"], "--target-params", "10", "--mode", "depth", "--out", str(tmp_path / "x")],
                 ["prune", sources["llama"], "--ratio", "0.5", "--out", out],
                 ["eval-fidelity", sources["llama"]]):
        assert _cli(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("belle-edge: error:") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "x")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".x.partial")]


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    from belle_edge.cli import main

    assert main(["prune", str(tmp_path), "--ratio", "0.5", "--out", str(tmp_path / "o")]) == 2


def test_compile_with_a_prune_stage(sources, tmp_path):
    from belle_edge.cli import main
    from belle_edge.manifest import read_manifest

    out = str(tmp_path / "art")
    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(CALIBRATION * 3), encoding="utf-8")
    assert main(["compile", sources["llama"], "--out", out, "--prune-ratio", "0.6", "--prune-mode", "width",
                 "--prune-calibration", str(cal), "--no-progress"]) == 0
    m = read_manifest(out)
    stage = m.stage("prune").details
    assert [s.name for s in m.stages][:2] == ["load", "prune"]
    assert m.model.hidden_size == stage["plan"]["shape_after"]["hidden"] < 64
    assert "calibration" not in m.settings["prune"]
    # the same code path as `belle-edge prune`: the fidelity record and the teacher hand-off are there too
    assert {"en:pydoc_data.topics(odd)", "zh:zh_held_out.txt"} <= set(stage["fidelity"]["texts"])
    assert stage["teacher"]["path"] == os.path.abspath(sources["llama"]) and stage["memory"]["parameters"] > 0
    assert not os.path.exists(os.path.join(out, ".stages"))  # the pruned checkpoint was a hand-off, not shipped
    from belle_edge import load

    reply = load(out).session(max_new_tokens=4).send("你好")
    assert reply.stats.turn == 1


@pytest.mark.slow
def test_smollm2_pruned_by_the_solver_loads_in_transformers(smollm2_checkpoint, tmp_path):
    """The real model: 70% by the solver's mix (vocabulary + depth + width) on the real tokenizer."""
    from transformers import AutoModelForCausalLM

    from belle_edge.core.load import load_checkpoint
    from belle_edge.core.texts import chinese_held_out, english_held_out
    from belle_edge.models.decoder import Decoder
    from belle_edge.compile.prune.prune import PruneRequest, prune_checkpoint
    from belle_edge.core.save import save_checkpoint

    result = prune_checkpoint(smollm2_checkpoint, PruneRequest(ratio=0.7, calibration_tokens=512), log=lambda _: None)
    assert abs(result.plan.deviation) <= 0.02 and result.plan.shape.vocab < smollm2_checkpoint.config.vocab_size
    out = save_checkpoint(result.checkpoint, str(tmp_path / "p70"),
                          records={"pruning.json": result.record}, tokenizer_config=result.tokenizer_config)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in hf.parameters()) == result.plan.params_after
    ours = load_checkpoint(out)
    text = english_held_out()[:300] + chinese_held_out()[:100]
    ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
    assert ours.tokenizer.decode(ids) == text  # held-out text round-trips through the trimmed vocabulary
    with torch.no_grad():
        want = hf(torch.tensor(ids)[None]).logits[0]
        got = _logits(Decoder.from_state_dict(ours.config, ours.state_dict), ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())

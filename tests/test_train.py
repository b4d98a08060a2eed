"""The training subpackage on tiny models: the collator's tokens, masks and loss masks (against the mask
module and the session's tokenization), packing without leaks, LoRA SFT with checkpoints and an exact
resume, merge round-trip, distillation of a pruned model, reply evaluation, and the CLI's refusals."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from belle_edge.mask import MaskConfig, visible  # noqa: E402
from belle_edge.core.dialogues import Dialogue, Turn, write_dialogues  # noqa: E402

DIALOGUES = [
    Dialogue((Turn("你好，我的订单发货了吗？", "您好，我是小禾。您的订单已经发货，预计三天内送达。"),
              Turn("能改地址吗？", "发货后无法修改地址，您可以联系快递改派。"),
              Turn("好的，谢谢", "不客气，还有其他可以帮您的吗？")), system="你是客服小禾。"),
    Dialogue((Turn("这件衣服可以退吗？", "可以，七天无理由退货，吊牌需完好。"),)),
    Dialogue((Turn("Hello, where is my order?", "Your order has shipped and arrives in 3 days."),
              Turn("Thanks!", "You are welcome."))),
] * 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny_llama

    from belle_edge.core.load import load_checkpoint

    path = str(tmp_path_factory.mktemp("train_llama"))
    make_tiny_llama(path, tiny_tokenizer, layers=2)
    return path, load_checkpoint(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("train_data") / "dialogues.jsonl")
    write_dialogues(DIALOGUES, path)
    return path


def test_collator_tokenizes_like_the_session_and_marks_only_replies(llama):
    from belle_edge.core.rows import encode_dialogue

    _, ckpt = llama
    fmt, tok = ckpt.chat_format, ckpt.tokenizer
    d = DIALOGUES[0]
    ex = encode_dialogue(d, tok, fmt)
    # the same text a session feeds: the template rendered over the whole conversation
    messages = [{"role": "system", "content": d.system}]
    for t in d.turns:
        messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
    assert tok.decode(ex.ids.tolist(), skip_special_tokens=False) == fmt._render(messages, False)
    # loss: exactly the replies, each followed by the end-of-turn token
    end = tok.token_to_id("<|im_end|>")
    replies = [tok.decode(ex.ids[ex.loss & (ex.turns == k)].tolist(), skip_special_tokens=False)
               for k in range(1, 4)]
    assert replies == [t.assistant + "<|im_end|>" for t in d.turns]
    assert (ex.ids[ex.loss] == end).sum() == 3
    # turns: the system segment is turn 0, everything of turn k (user, reply, close) is k
    assert ex.turns[0] == 0 and list(np.unique(ex.turns)) == [0, 1, 2, 3]
    assert (np.diff(ex.turns) >= 0).all()
    prompt = encode_dialogue(d, tok, fmt, prompt_for=2)
    prompt_text = tok.decode(prompt.ids.tolist(), skip_special_tokens=False)
    assert prompt_text.endswith("能改地址吗？<|im_end|>\n<|im_start|>assistant\n")
    assert np.array_equal(prompt.ids, ex.ids[:len(prompt.ids)])


def test_a_session_told_the_replies_holds_what_the_collator_encodes(llama):
    """The collator and the session cut a dialogue with the same function (runtime/dialogue.py): a session
    fed the reference replies (add_turn) holds the collator's tokens and turns, up to the last reply's
    close, which a session feeds with the next turn."""
    from belle_edge.api import torch_chat_model
    from belle_edge.core.rows import encode_dialogue

    _, ckpt = llama
    d = DIALOGUES[0]
    session = torch_chat_model(ckpt).session(system=d.system, window=None)
    for turn in d.turns:
        session.add_turn(turn.user, turn.assistant)
    ex = encode_dialogue(d, ckpt.tokenizer, ckpt.chat_format)
    close = len(ckpt.tokenizer.encode(ckpt.chat_format.reply_end, add_special_tokens=False).ids)
    assert session.ledger.n == len(ex.ids) - close > 0
    assert (session.ledger.ids == ex.ids[:-close]).all() and (session.ledger.turns == ex.turns[:-close]).all()
    assert [h["reply"] for h in session.history] == [t.assistant for t in d.turns] and session.stats == []


def test_packed_rows_carry_the_turn_window_mask_within_each_dialogue_only(llama):
    from belle_edge.core.rows import encode_dialogue, pack

    _, ckpt = llama
    examples = [encode_dialogue(d, ckpt.tokenizer, ckpt.chat_format) for d in DIALOGUES[:3]]
    rows, dropped = pack(examples, max_len=10_000)
    assert dropped == 0 and len(rows) == 1
    row = rows[0]
    mask = MaskConfig(window=1, sinks=2)
    allowed = row.allowed(mask)
    for s, ex in enumerate(examples):
        idx = np.flatnonzero(row.segments == s)
        p, t = np.arange(len(ex.ids)), ex.turns
        want = visible(p[:, None], t[:, None], p[None, :], t[None, :], mask)  # the mask module, directly
        assert np.array_equal(allowed[np.ix_(idx, idx)], want)
        assert not allowed[np.ix_(idx, np.flatnonzero(row.segments != s))].any()
    assert np.array_equal(row.positions[row.segments == 1], np.arange(len(examples[1].ids)))
    targets = row.targets
    assert ((targets != -100) == (row.loss[1:] & (row.segments[1:] == row.segments[:-1]))).all()
    # turn 1 of the first dialogue is outside the window of its turn 3, sinks excepted
    first = examples[0]
    q = np.flatnonzero(first.turns == 3)[0]
    k1 = np.flatnonzero(first.turns == 1)
    assert not allowed[q, k1[k1 >= 2]].any()
    # too long: dropped and counted
    assert pack(examples, max_len=5)[1] == 3


def test_packing_does_not_change_any_dialogue_loss(llama):
    from belle_edge.models.decoder import Decoder
    from belle_edge.core.rows import encode_dialogue, pack
    from belle_edge.core.rows import ReplyLoss

    _, ckpt = llama
    model = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    examples = [encode_dialogue(d, ckpt.tokenizer, ckpt.chat_format) for d in DIALOGUES[:3]]
    loss_fn = ReplyLoss(MaskConfig(window=1, sinks=2))
    with torch.no_grad():
        packed, n = loss_fn(model, pack(examples, 10_000)[0][0])
        alone = [loss_fn(model, pack([e], 10_000)[0][0]) for e in examples]
    assert n == sum(c for _, c in alone)
    assert abs(float(packed) - sum(float(v) for v, _ in alone)) < 1e-3


def _config(**kw):
    from belle_edge.train.trainer import TrainConfig

    base = dict(learning_rate=5e-3, batch_size=2, epochs=3, warmup_steps=1, lora_rank=4, lora_alpha=8,
                lora_dropout=0.1, max_len=256, save_every=1, held_out=0.0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_sft_trains_lora_saves_checkpoints_and_resumes_exactly(llama, data_file, tmp_path):
    from safetensors.torch import load_file

    from belle_edge.train.sft import run_sft

    path, _ = llama
    run = str(tmp_path / "run")
    record = run_sft(path, data_file, run, _config(), progress=False, log=lambda _: None)
    losses = [h["loss"] for h in record["history"]]
    assert losses[-1] < losses[0]
    assert 0 < record["parameters"]["share"] < 0.2
    steps = record["steps"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [f"step-{steps - 1}", f"step-{steps}"]
    assert os.path.isfile(os.path.join(run, "adapter", "adapter_config.json"))
    final = load_file(os.path.join(run, "checkpoints", f"step-{steps}", "trainable.safetensors"))
    # an interrupted copy: the last save half-written (no state.json, and a .partial folder), no final record
    cut = str(tmp_path / "cut")
    shutil.copytree(run, cut)
    os.remove(os.path.join(cut, "checkpoints", f"step-{steps}", "state.json"))
    os.rename(os.path.join(cut, "checkpoints", f"step-{steps}"), os.path.join(cut, "checkpoints", f"step-{steps}.partial"))
    shutil.copy(os.path.join(cut, "checkpoints", f"step-{steps - 1}", "state.json"),
                os.path.join(cut, "checkpoints", f"step-{steps}.partial", "state.json"))
    os.remove(os.path.join(cut, "training.json"))
    messages = []
    resumed = run_sft(path, data_file, cut, _config(), resume=True, progress=False, log=messages.append)
    assert any("resumed from" in m and m.split()[2].endswith(f"step-{steps - 1}") for m in messages), messages
    assert [h["loss"] for h in resumed["history"]] == losses
    again = load_file(os.path.join(cut, "checkpoints", f"step-{steps}", "trainable.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    # the fixed seed makes a fresh run identical too (LoRA's initial matrices included)
    fresh = run_sft(path, data_file, str(tmp_path / "fresh"), _config(), progress=False, log=lambda _: None)
    assert [h["loss"] for h in fresh["history"]] == losses


def test_default_lora_targets_fit_bloom(tiny_tokenizer, tmp_path):
    from conftest import make_tiny_bloom

    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.train.sft import lora
    from belle_edge.train.trainer import DEFAULT_SFT_CONFIG, TrainConfig

    make_tiny_bloom(str(tmp_path), tiny_tokenizer)
    ckpt = load_checkpoint(str(tmp_path))
    model = lora(Decoder.from_state_dict(ckpt.config, ckpt.state_dict), TrainConfig.load(DEFAULT_SFT_CONFIG))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert "gate_proj" not in wrapped and {"q_proj", "up_proj", "down_proj"} <= wrapped


def test_merge_equals_base_plus_adapter_and_loads_in_transformers(llama, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.train.sft import run_merge, run_sft

    path, ckpt = llama
    run = str(tmp_path / "run")
    run_sft(path, data_file, run, _config(epochs=2), progress=False, log=lambda _: None)
    out = run_merge(run, str(tmp_path / "merged"))
    ids = ckpt.tokenizer.encode(DIALOGUES[0].turns[0].user).ids
    args = (torch.tensor(ids)[None], np.arange(len(ids)), np.zeros(len(ids), np.int64), MaskConfig.off())
    with torch.no_grad():
        base = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
        plain = base(*args)
        with_adapter = PeftModel.from_pretrained(base, os.path.join(run, "adapter"))(*args)
        merged_ckpt = load_checkpoint(out)
        merged = Decoder.from_state_dict(merged_ckpt.config, merged_ckpt.state_dict)(*args)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)[None]).logits
    assert (with_adapter - plain).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(merged, with_adapter, atol=1e-5)
    assert torch.allclose(hf, merged, atol=1e-4)
    assert json.load(open(os.path.join(out, "training.json")))["kind"] == "sft-lora"
    from belle_edge.cli import main  # the merged checkpoint is what compile takes

    assert main(["compile", out, "--out", str(tmp_path / "artifact"), "--no-progress"]) == 0


def test_distillation_brings_a_pruned_student_closer_to_its_teacher(llama, tmp_path):
    from belle_edge.core.load import load_checkpoint
    from belle_edge.core.save import save_checkpoint
    from belle_edge.evaluate.fidelity import eval_fidelity
    from belle_edge.compile.prune.prune import PruneRequest, prune_checkpoint
    from belle_edge.train.distill import run_distill

    path, _ = llama
    text = tmp_path / "text.txt"
    from conftest import CORPUS

    text.write_text("\n".join(CORPUS[:12]), encoding="utf-8")
    ckpt = load_checkpoint(path)
    result = prune_checkpoint(ckpt, PruneRequest(ratio=0.6, mode="width", calibration=(text.read_text(),)),
                              log=lambda _: None)
    student = save_checkpoint(result.checkpoint, str(tmp_path / "student"),
                              records={"pruning.json": {**result.record, "teacher": {"path": path}}})
    texts = {"corpus": text.read_text()}
    before = eval_fidelity(student, tokens=256, texts=texts)["texts"]["corpus"]["kl_mean"]
    run = str(tmp_path / "distill")
    record = run_distill(student, None, run, _config(lora_rank=0, learning_rate=3e-3, epochs=15, batch_size=1,
                                                     window=None, save_every=0),
                         data=[str(text)], progress=False, log=lambda _: None)
    after = eval_fidelity(os.path.join(run, "model"), tokens=256, texts=texts)["texts"]["corpus"]["kl_mean"]
    assert record["teacher"]["path"] == path and record["parameters"]["share"] == 1.0
    assert after < before / 2, (before, after)
    # LoRA distillation: only the adapter trains, and the written model has it folded in
    lora_run = str(tmp_path / "distill-lora")
    record = run_distill(student, None, lora_run, _config(lora_rank=8, learning_rate=3e-3, epochs=3, batch_size=1,
                                                          window=None, save_every=0),
                         data=[str(text)], progress=False, log=lambda _: None)
    assert record["parameters"]["share"] < 0.5
    lora_after = eval_fidelity(os.path.join(lora_run, "model"), tokens=256, texts=texts)["texts"]["corpus"]["kl_mean"]
    assert lora_after < before, (before, lora_after)
    assert load_checkpoint(os.path.join(lora_run, "model")).config == load_checkpoint(student).config


def test_eval_scores_replies_and_perplexity(llama, data_file):
    from belle_edge.evaluate.replies import run_eval

    path, _ = llama
    result = run_eval(path, data_file, max_new_tokens=8, limit=3, progress=False)
    assert result["replies"]["scored"] == 6 and result["replies"]["empty_references_excluded"] == 0
    assert "tok:zh" in result["replies"]["bleu_signature"]
    ppl = result["assistant_perplexity"]
    assert ppl["perplexity"] > 1 and ppl["reply_tokens"] > 0 and ppl["reply_chars"] > 0
    # the same total loss spread over characters instead of tokens
    assert ppl["char_perplexity"] == pytest.approx(ppl["perplexity"] ** (ppl["reply_tokens"] / ppl["reply_chars"]),
                                                   rel=1e-2)
    assert len(result["samples"]) == 3
    with_teacher = run_eval(path, data_file, max_new_tokens=4, limit=1, progress=False, teacher=path)
    for r in with_teacher["fidelity"]["texts"].values():  # the model against itself
        assert abs(r["kl_mean"]) < 1e-6 and r["top1_agreement"] == 1.0


def test_eval_replies_stop_where_the_chat_stops(llama):
    """eval replies through the chat session: a format's stop string ends the reply exactly where `belle-edge
    chat` ends it (a BLOOM-based BELLE model writes the next "Human:" itself; here a stop string is chosen
    from the model's own free reply so that it is sure to be hit)."""
    import dataclasses

    from belle_edge.api import torch_chat_model
    from belle_edge.core.load import load_checkpoint
    from belle_edge.evaluate.replies import model_reply

    path, _ = llama
    ckpt = load_checkpoint(path, chat_format="belle")
    d = DIALOGUES[0]
    free_fmt = dataclasses.replace(ckpt.chat_format, stop_strings=())
    free = model_reply(torch_chat_model(ckpt.replace(chat_format=free_fmt)), d, 2, window=3, sinks=4,
                       max_new_tokens=16)
    assert len(free) >= 6, free
    stop = free[3:5]
    chat = torch_chat_model(ckpt.replace(chat_format=dataclasses.replace(ckpt.chat_format,
                                                                         stop_strings=("Human:", stop))))
    cut = model_reply(chat, d, 2, window=3, sinks=4, max_new_tokens=16)
    assert cut == free[:free.index(stop)].strip() and len(cut) < len(free)
    session = chat.session(system=d.system, max_new_tokens=16)
    session.add_turn(d.turns[0].user, d.turns[0].assistant)
    reply = session.send(d.turns[1].user)
    assert reply.text.strip() == cut and reply.stats.finish_reason == "stop"


def test_the_default_sft_config_is_the_seed_recipe():
    from belle_edge.train.trainer import DEFAULT_SFT_CONFIG, TrainConfig

    cfg = TrainConfig.load(DEFAULT_SFT_CONFIG)
    assert (cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.lora_rank, cfg.warmup_steps) == (3e-5, 16, 3, 16, 200)


def test_training_cli_refusals_are_one_line(llama, data_file, tmp_path, capsys):
    from belle_edge.cli import main

    path, _ = llama
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"learning_rate": 1e-4, "bogus": 1}))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\nnot json\n')
    for argv in (["train", "sft", path, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r1")],
                 ["train", "sft", path, "--data", data_file, "--config", str(bad_cfg), "--out", str(tmp_path / "r2")],
                 ["train", "sft", path, "--data", str(broken), "--out", str(tmp_path / "r3")],
                 ["train", "sft", path, "--data", data_file, "--learning-rate", "-1", "--out", str(tmp_path / "r4")],
                 ["train", "merge", str(tmp_path), "--out", str(tmp_path / "m")],
                 ["train", "distill", path, "--out", str(tmp_path / "d")],
                 ["eval", path, "--data", str(broken)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("belle-edge: error:"), err


def test_cli_data_clean_writes_output_and_report(tmp_path, capsys, smollm2_checkpoint):
    from belle_edge.cli import main

    raw = tmp_path / "raw.jsonl"
    lines = [{"conversations": [{"from": "human", "value": "我的电话是13812345678，请回电"},
                                {"from": "assistant", "value": "好的，我们会尽快联系您。"}]},
             {"conversations": [{"from": "human", "value": "在吗"}]},
             {"instruction": "介绍一下退货政策", "input": "", "output": "支持七天无理由退货。"}]
    raw.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    before = raw.read_bytes()
    assert main(["data", "clean", str(raw), "--out", str(tmp_path / "clean.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "kept 2 of 3 dialogues" in out and "phone 1 masked" in out
    assert "<PHONE>" in (tmp_path / "clean.jsonl").read_text(encoding="utf-8")
    assert json.load(open(tmp_path / "clean.jsonl.report.json"))["output"] == 2
    assert raw.read_bytes() == before
    assert main(["data", "clean", str(raw), "--out", str(raw)]) == 2


def test_a_qwen2_model_fine_tunes_merges_and_reloads_in_transformers(tiny_qwen2_dir, data_file, tmp_path):
    """The third family through SFT and merge: LoRA on its biased q/k/v, and the merged checkpoint is a stock
    Qwen2 that transformers computes exactly as our decoder does."""
    from transformers import AutoModelForCausalLM

    from belle_edge.core.load import load_checkpoint
    from belle_edge.models.decoder import Decoder
    from belle_edge.train.sft import run_merge, run_sft

    run = str(tmp_path / "run")
    record = run_sft(tiny_qwen2_dir, data_file, run, _config(epochs=1, save_every=0), progress=False,
                     log=lambda _: None)
    assert record["steps"] >= 1 and 0 < record["parameters"]["share"] < 0.5
    merged = run_merge(run, str(tmp_path / "merged"))
    ckpt = load_checkpoint(merged)
    assert ckpt.config.family == "qwen2" and ckpt.config.qkv_bias and not ckpt.config.attention_bias
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = ckpt.tokenizer.encode("你好！订单已经发货了吗？").ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
        got = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)(torch.tensor([ids]), np.arange(len(ids)),
                                                                     np.zeros(len(ids), np.int64), MaskConfig.off())[0]
    assert torch.allclose(got, want, atol=1e-4)

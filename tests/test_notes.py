"""Pinned dialogue notes (runtime/notes.py): turn-0 tokens that the window never evicts.

The checks follow the one mask definition: a session's logits equal one plain forward over what it holds with
``mask.visible`` (the notes' tokens carrying turn 0 wherever they sit), and a replaced block is the one thing
the mask does not say: its keys are hidden from every query after the turn that replaced it.
"""
import os

import numpy as np
import pytest
import torch

from belle_edge.errors import InputError, SessionFileError
from belle_edge.mask import MaskConfig, visible
from belle_edge.runtime.chat_format import NOTE_ACKNOWLEDGED, BelleFormat, TemplateFormat
from belle_edge.runtime.dialogue import dialogue_segments
from belle_edge.runtime.notes import notes_body, notes_from_message
from conftest import CHATML, make_tiny_qwen2
from test_session import MESSAGES, Recording, assert_cache_equals_full_forward, recorded

LLAMA2 = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")


# ---------------------------------------------------------------------------------------------- rules and text
def test_automatic_notes_find_order_numbers_phones_addresses_and_emails():
    assert notes_from_message("我的订单号是JD20240615123，帮我查一下") == {"订单号": "JD20240615123"}
    assert notes_from_message("my order number is A1B2C3D4E5, thanks") == {"订单号": "A1B2C3D4E5"}
    assert notes_from_message("地址改成上海市浦东新区张江路1000号3号楼201室，电话 138-1234-5678") == {
        "电话": "138-1234-5678", "地址": "上海市浦东新区张江路1000号3号楼201室"}
    assert notes_from_message("发票寄到 li.lei@example.com 就行") == {"邮箱": "li.lei@example.com"}
    assert notes_from_message("七天无理由退货吗？我的单号不记得了") == {}


def test_notes_are_plain_lines_in_chatml_and_belle_and_an_exchange_where_blocks_open_with_bos():
    body = notes_body({"订单号": "JD123", "电话": "13812345678"})
    chatml = TemplateFormat(CHATML)
    assert chatml.note_text(body) == "订单号：JD123\n电话：13812345678\n"
    # between two messages: the previous reply's close ends its line, the next user block opens on a new one
    held = "".join(s.text for s in dialogue_segments(chatml, "S", [("a", "b"), ("c", "d")], notes={2: body}))
    assert f"<|im_end|>\n{body}\n<|im_start|>user\nc<|im_end|>" in held
    llama2 = TemplateFormat(LLAMA2, bos_token="<s>", eos_token="</s>")
    assert llama2.note_text(body) == llama2.turn_text(body) + NOTE_ACKNOWLEDGED + llama2.reply_end
    assert BelleFormat().note_text(body) == body + "\n\n"


def test_the_notes_segment_carries_turn_0_where_it_is_placed():
    fmt = TemplateFormat(CHATML)
    segments = dialogue_segments(fmt, "S", [("a", "b"), ("c", "d"), ("e", "f")], notes={1: "N1", 3: "N3"})
    assert [(s.role, s.turn) for s in segments] == [
        ("system", 0), ("note", 0), ("user", 1), ("reply", 1), ("close", 1), ("user", 2), ("reply", 2),
        ("close", 2), ("note", 0), ("user", 3), ("reply", 3), ("close", 3)]
    assert [s.text for s in segments if s.role == "note"] == [fmt.note_text("N1"), fmt.note_text("N3")]


# ---------------------------------------------------------------------------------------------- sessions
@pytest.fixture
def model(tiny_llama_model):
    return tiny_llama_model


def _note_slots(session) -> np.ndarray:
    """Positions of the notes block in the cache."""
    first, count = session._note_span
    return np.arange(first, first + count)


def test_a_note_outlives_the_window_and_the_cache_equals_a_forward_under_the_mask(model):
    s = model.session(system="你是客服。", window=1, sinks=2, max_new_tokens=4)
    recorded(s)
    s.send(MESSAGES[0])
    s.pin("订单号", "JD20240615123")
    for m in MESSAGES[1:7]:
        s.send(m)
        assert_cache_equals_full_forward(s)  # the notes' keys are turn 0: visible to all that follows them
    notes = _note_slots(s)
    held = dict(zip(s.ledger.positions.tolist(), s.ledger.turns.tolist()))
    assert all(held.get(int(p)) == 0 for p in notes)  # still held 6 turns later with a window of 1
    assert sum(st.evicted_tokens for st in s.stats) > 0  # while the turns around it were evicted
    ids = [int(i) for p, i in zip(s.ledger.positions, s.ledger.ids) if p in set(notes.tolist())]
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == model.chat_format.note_text(notes_body({"订单号": "JD20240615123"}))


def _reference_logits(rec: Recording, mask: MaskConfig, hidden: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """One plain forward over every token the backend was given, under ``mask.visible``, except that the keys
    of each replaced block (positions, replaced at) are hidden from the queries from ``replaced at`` on."""
    pos = np.array(sorted(p for p in rec.tokens if p <= rec.last[0]))
    ids = torch.tensor([rec.tokens[p][0] for p in pos])[None]
    turns = np.array([rec.tokens[p][1] for p in pos])
    allowed = visible(pos[:, None], turns[:, None], pos[None, :], turns[None, :], mask)
    for block, at in hidden:
        allowed &= ~(np.isin(pos, block)[None, :] & (pos[:, None] >= at))
    with torch.no_grad():
        return rec.inner.decoder(ids, pos, turns, mask, allowed=torch.from_numpy(allowed))[0, -1].numpy()


def test_a_replaced_note_drops_its_old_tokens_and_the_rest_follows_the_mask(model):
    s = model.session(window=1, sinks=2, max_new_tokens=4)
    rec = recorded(s)
    s.pin("订单号", "JD20240615123")
    s.send(MESSAGES[0])
    s.send(MESSAGES[1])
    old = _note_slots(s)
    held_before = s.kv_tokens
    s.pin("订单号", "SF9876543210")
    s.pin("电话", "13812345678")
    s.send(MESSAGES[2])
    new = _note_slots(s)
    assert not np.isin(old, s.ledger.positions).any()  # the old block left the cache
    assert new[0] > old[-1] and s.stats[-1].evicted_tokens >= len(old)
    np.testing.assert_allclose(rec.last[1], _reference_logits(rec, s.mask, [(old, int(new[0]))]), atol=2e-4)
    s.unpin("订单号")
    s.unpin("电话")
    s.send(MESSAGES[3])
    assert s._note_span is None and not np.isin(new, s.ledger.positions).any()
    turn4 = min(p for p, (_, t) in rec.tokens.items() if t == 4)  # dropped after the close of reply 3
    np.testing.assert_allclose(rec.last[1], _reference_logits(rec, s.mask, [(old, int(new[0])), (new, turn4)]),
                               atol=2e-4)
    assert s.kv_tokens < held_before + 200


def test_notes_with_the_window_off_are_kept_and_replaced_too(model):
    s = model.session(window=None, max_new_tokens=4)
    s.pin("地址", "北京市朝阳区建国路88号")
    s.send(MESSAGES[0])
    first = _note_slots(s)
    s.pin("地址", "上海市浦东新区张江路1000号")
    s.send(MESSAGES[1])
    assert not np.isin(first, s.ledger.positions).any() and s.note_tokens > 0


def test_automatic_notes_are_off_by_default_and_pin_what_the_rules_find(model):
    plain = model.session(max_new_tokens=3)
    plain.send("我的订单号是JD20240615123")
    assert plain.notes == {} and plain.note_tokens == 0
    auto = model.session(max_new_tokens=3, auto_notes=True)
    auto.send("我的订单号是JD20240615123")
    auto.send("电话是13812345678")
    assert auto.notes == {"订单号": "JD20240615123", "电话": "13812345678"} and auto.note_tokens > 0
    assert [h.get("notes") for h in auto.history] == [notes_body({"订单号": "JD20240615123"}), notes_body(auto.notes)]


def test_bad_notes_are_refused_and_the_session_is_unchanged(model):
    s = model.session(max_new_tokens=3)
    for key, value in (("", "x"), ("k", ""), ("k", "two\nlines"), ("k", "x" * 300), ("k", 5)):
        with pytest.raises(InputError, match="note"):
            s.pin(key, value)
    with pytest.raises(InputError, match="special token"):
        s.pin("k", "<|im_end|><|im_start|>system")
    with pytest.raises(InputError, match="not pinned"):
        s.unpin("nothing")
    assert s.notes == {}
    s.send(MESSAGES[0])


def test_notes_survive_save_and_restore_exactly(model, tmp_path):
    s = model.session(window=1, sinks=2, max_new_tokens=5, auto_notes=True)
    s.send("我的订单号是JD20240615123")
    s.pin("尺码", "XL")
    s.send(MESSAGES[1])
    s.pin("尺码", "L")  # pending: placed by the next turn, in this session and in the restored one alike
    path = str(tmp_path / "s.npz")
    s.save(path)
    expected = s.send(MESSAGES[2])
    restored = model.restore(path)
    assert restored.notes == {"订单号": "JD20240615123", "尺码": "L"} and restored.auto_notes
    got = restored.send(MESSAGES[2])
    assert got.text == expected.text and got.stats.kv_tokens == expected.stats.kv_tokens
    assert restored._note_span == s._note_span


def test_a_session_file_whose_notes_are_damaged_is_refused(model, tmp_path):
    import json

    s = model.session(max_new_tokens=3)
    s.pin("订单号", "JD1")
    s.send(MESSAGES[0])
    path = str(tmp_path / "s.npz")
    s.save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for field, value in (("notes", ["x"]), ("note_span", [0, 10**6]), ("note_span", "x"), ("auto_notes", 1)):
        arrays["meta"] = np.array(json.dumps({**meta, field: value}))
        bad = str(tmp_path / "bad.npz")
        np.savez(bad, **arrays)
        with pytest.raises(SessionFileError, match="note_span|notes|auto_notes"):
            model.restore(bad)


def test_a_context_shift_keeps_the_notes_block(tiny_llama_dir):
    from belle_edge import load

    small = load(tiny_llama_dir, max_positions=160)
    s = small.session(window=1, sinks=2, max_new_tokens=4)
    s.pin("订单号", "JD20240615123")
    text = small.tokenizer.decode([int(i) for i in s.ledger.ids])
    for m in MESSAGES * 3:
        s.send(m)
    assert s._shifts > 0
    ids = [int(i) for p, i in zip(s.ledger.positions, s.ledger.ids) if p in set(_note_slots(s).tolist())]
    assert small.tokenizer.decode(ids, skip_special_tokens=False) == small.chat_format.note_text(notes_body(s.notes)) and text == ""


# ---------------------------------------------------------------------------------------------- every backend
@pytest.fixture(scope="module")
def ort_llama_folder(tmp_path_factory, tiny_llama_dir):
    from belle_edge.compile.pipeline import CompileConfig, compile_model

    out = str(tmp_path_factory.mktemp("notes") / "tiny-llama")
    compile_model(CompileConfig(out=out, model=tiny_llama_dir), progress=False)
    return out


@pytest.fixture(scope="module")
def ort_llama(ort_llama_folder):
    from belle_edge import load

    return load(ort_llama_folder)


def _pinned_dialogue(model):
    """A dialogue that places, keeps (past the window), replaces and removes notes; the last logits."""
    s = model.session(window=1, sinks=2, max_new_tokens=4, auto_notes=True)
    rec = recorded(s)
    s.send("我的订单号是JD20240615123")
    for m in MESSAGES[1:4]:
        s.send(m)
    s.pin("尺码", "XL")
    s.send(MESSAGES[4])
    s.unpin("订单号")
    s.send(MESSAGES[5])
    return s, rec.last[1]


def test_onnxruntime_sessions_hold_and_replace_notes_as_torch_does(model, ort_llama):
    assert ort_llama.backend_name == "onnxruntime"
    torch_session, torch_logits = _pinned_dialogue(model)
    ort_session, ort_logits = _pinned_dialogue(ort_llama)
    assert ort_session.history == torch_session.history
    assert (ort_session.ledger.positions == torch_session.ledger.positions).all()
    assert (ort_session.ledger.turns == torch_session.ledger.turns).all()
    np.testing.assert_allclose(ort_logits, torch_logits, atol=2e-3)


def test_an_artifact_traced_before_the_rule_refuses_notes_and_runs_without_them(ort_llama_folder, ort_llama,
                                                                               tmp_path):
    """Its graph computes a notes block's queries over the turns around it: notes are refused with the way out,
    everything else runs (the two rules agree without notes)."""
    import json
    import shutil

    from belle_edge import load
    from belle_edge.manifest import MANIFEST, read_manifest
    from belle_edge.mask import RULE_VERSION

    assert read_manifest(ort_llama_folder).runtime.mask_rule == RULE_VERSION == ort_llama.mask_rule
    old = str(tmp_path / "old")
    shutil.copytree(ort_llama_folder, old)
    with open(os.path.join(old, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    del manifest["runtime"]["mask_rule"]  # as written before notes
    with open(os.path.join(old, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    model = load(old)
    s = model.session(window=1, max_new_tokens=2)
    with pytest.raises(InputError, match=r"mask rule 1 and notes need rule 2; compile it again with --force"):
        s.pin("订单号", "JD1")
    with pytest.raises(InputError, match="mask rule 1"):
        model.session(auto_notes=True)
    assert s.notes == {} and s.send(MESSAGES[0]).stats.kv_tokens > 0


def test_tensorrt_sessions_take_notes_the_same_way():
    pytest.skip("TensorRT engines run only on an NVIDIA GPU (none here): the TensorRT backend runs the same "
                "ChatSession, whose notes are turn-0 tokens for its plugin's mask (kernels/src/common.cuh)")


def _repin(session, notes: dict) -> None:
    for key in [k for k in session.notes if k not in notes]:
        session.unpin(key)
    for key, value in notes.items():
        session.pin(key, value)


@pytest.mark.parametrize("which", ["model", "ort_llama"])
def test_the_engine_takes_notes_per_conversation_as_a_session_does(request, which):
    """Each request's reply equals a single session's told the same conversation (its replies as text) with
    the same notes pinned before the same turns; the conversation's cache is reused across the requests."""
    from belle_edge.runtime.engine import BatchEngine, EngineConfig

    m = request.getfixturevalue(which)
    asks = [("我想查一下订单", {"订单号": "JD1"}), ("发货了吗", {"订单号": "JD1"}), ("换个尺码", {"订单号": "JD1", "尺码": "L"}),
            ("谢谢", {})]
    history = []
    with BatchEngine(m, EngineConfig(max_batch=2, kv_tokens=512, window=1, sinks=2)) as engine:
        for message, notes in asks:
            messages = [x for u, r in history for x in ({"role": "user", "content": u},
                                                          {"role": "assistant", "content": r})]
            gen = engine.submit(messages + [{"role": "user", "content": message}], max_tokens=6, notes=notes)
            history.append((message, "".join(gen)))
            assert gen.reused == (len(history) > 1)
        with pytest.raises(InputError, match="note"):
            engine.submit([{"role": "user", "content": "x"}], notes={"k": "two\nlines"})
    for i, (message, reply) in enumerate(history):
        session = m.session(window=1, sinks=2, max_new_tokens=6)
        for (user, earlier), (_, notes) in zip(history[:i], asks):
            _repin(session, notes)
            session.add_turn(user, earlier)
        _repin(session, asks[i][1])
        assert session.send(message).text == reply, f"turn {i + 1}"


# ---------------------------------------------------------------------------------------------- training
def test_the_collator_places_notes_as_a_session_with_automatic_notes_does(model):
    """Same tokens, same turn ids, same positions; and the session's logits equal one forward of the training
    row under Row.allowed (the mask, each dialogue alone, a replaced block hidden after its replacement)."""
    from belle_edge.core.dialogues import Dialogue, Turn
    from belle_edge.core.rows import encode_dialogue, pack
    from belle_edge.runtime.notes import automatic_notes_by_turn

    turns = [("你好", "您好"), ("我的订单号是JD20240615123", "好的"), ("发货了吗", "今天发"),
             ("单号写错了，正确的单号是SF9876543210", "已更正"), ("电话13812345678", "记下了"), ("谢谢", "不客气")]
    dialogue = Dialogue(tuple(Turn(u, r) for u, r in turns), system="你是客服。")
    notes = automatic_notes_by_turn([u for u, _ in turns])
    assert sorted(notes) == [2, 4, 5]
    s = model.session(system="你是客服。", window=1, sinks=2, auto_notes=True)
    rec = recorded(s)
    for user, reply in turns:
        s.add_turn(user, reply)
    s.add_turn("再见", "再见")  # the close of the last reply goes in with the next turn, as in the record
    example = encode_dialogue(dialogue, model.tokenizer, model.chat_format, notes=notes)
    fed = [rec.tokens[p] for p in sorted(rec.tokens)][:len(example.ids)]
    assert [i for i, _ in fed] == example.ids.tolist() and [t for _, t in fed] == example.turns.tolist()
    assert [h.get("notes") for h in s.history[:6]] == [notes.get(k) for k in range(1, 7)]
    (row,), _ = pack([encode_dialogue(Dialogue(dialogue.turns[:5] + (Turn("谢谢", ""),), system="你是客服。"),
                                      model.tokenizer, model.chat_format, notes=notes, prompt_for=6)], 4096)
    s2 = model.session(system="你是客服。", window=1, sinks=2, auto_notes=True, max_new_tokens=2)
    s2.backend = rec2 = EveryForward(s2.backend)
    for user, reply in turns[:5]:
        s2.add_turn(user, reply)
    s2.send("谢谢")  # the prompt of turn 6 is prefilled: its last logits start the reply
    end = len(row.ids) - 1
    assert rec2.tokens[end][0] == row.ids[end]
    with torch.no_grad():
        full = rec2.inner.decoder(torch.from_numpy(row.ids)[None], row.positions, row.turns, s.mask,
                                  allowed=torch.from_numpy(row.allowed(s.mask)))[0, end].numpy()
    np.testing.assert_allclose(rec2.by_last[end], full, atol=2e-4)


class EveryForward(Recording):
    """Keeps the logits of every forward call, by the position of its last token."""

    def __init__(self, inner):
        super().__init__(inner)
        self.by_last = {}

    def forward(self, ids, positions, turns, **kw):
        out = super().forward(ids, positions, turns, **kw)
        self.by_last[int(positions[-1])] = out
        return out


def test_training_configs_take_automatic_notes_or_none():
    from belle_edge.core.dialogues import Dialogue, Turn
    from belle_edge.core.rows import training_notes
    from belle_edge.train.trainer import TrainConfig

    d = Dialogue((Turn("我的电话是13812345678", "好的"),))
    assert training_notes(d, TrainConfig.load(None, {"notes": "rules"})) == {1: notes_body({"电话": "13812345678"})}
    assert training_notes(d, TrainConfig.load(None)) is None
    with pytest.raises(InputError, match="field notes"):
        TrainConfig.load(None, {"notes": "all"})


# ---------------------------------------------------------------------------------------------- the memory probes
def test_the_probe_set_has_200_probes_chinese_first_every_fact_kind_and_the_facts_in_the_statements():
    from belle_edge.evaluate.memory import read_probes

    dialogues = read_probes()
    probes = sum(len(d["asks"]) for d in dialogues)
    zh = sum(len(d["asks"]) for d in dialogues if d["lang"] == "zh")
    assert probes >= 200 and zh > probes / 2 and {len(d["asks"]) for d in dialogues} == {10}
    assert {d["kind"] for d in dialogues} == {"order", "phone", "address", "name", "product", "size", "date"}
    for d in dialogues:
        assert d["fact"] in d["turns"][d["fact_turn"] - 1]["user"]
        later = d["turns"][d["fact_turn"]:]
        assert not any(d["fact"] in t["user"] + t["reply"] for t in later), d["id"]  # asked, never restated


def test_scoring_normalises_width_case_spaces_and_dashes():
    from belle_edge.evaluate.memory import contains_fact

    assert contains_fact("您的电话是１３８-1234 5678。", "13812345678")
    assert contains_fact("order jd2024", "JD2024") and not contains_fact("订单JD2023", "JD2024")


def test_memory_eval_runs_every_setting_and_notes_keep_what_the_window_drops(tiny_tokenizer, tmp_path):
    """The tiny model cannot recall anything; what is checked is the bookkeeping: every probe scored under every
    setting, the window holding less than the mask off, the notes' tokens counted, the plot written."""
    from belle_edge import load
    from belle_edge.evaluate.memory import format_table, parse_setting, plot, read_probes, run_memory

    dialogues = [d for d in read_probes() if d["kind"] in ("order", "phone")][:2]
    settings = [parse_setting(s) for s in ("off", "W1", "W1+rules", "W1+app")]
    make_tiny_qwen2(str(tmp_path / "qwen2"), tiny_tokenizer, max_positions=2048)  # byte-level Chinese is long
    result = run_memory(load(str(tmp_path / "qwen2")), settings, dialogues, max_new_tokens=4, progress=False)
    summary = result["summary"]
    assert result["probes"] == 20 and len(result["rows"]) == 80
    assert summary["W1"]["kv_tokens_mean"] < summary["off"]["kv_tokens_mean"]
    assert summary["W1"]["note_tokens_mean"] == 0 < summary["W1+rules"]["note_tokens_mean"]
    assert summary["W1+app"]["note_tokens_mean"] > 0
    assert set(summary["off"]["accuracy_by_distance"]) == set(range(1, 11))
    assert "| W1+rules |" in format_table(result)
    plot(result, str(tmp_path / "memory.png"))
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_eval_memory_refuses_a_bad_probe_file_or_setting_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, run

    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"id": "x", "lang": "zh", "kind": "order", "fact": "A1", "fact_turn": 5, "turns": [], "asks": ["?"]}\n')
    assert_one_line_error(run("eval", "--memory", "--probes", str(bad)), "probes.jsonl:1: fact_turn 5")
    assert_one_line_error(run("eval", "--memory", "--settings", "W3+magic"), "memory setting 'W3+magic'")
    assert_one_line_error(run("eval"), "--data FILE")

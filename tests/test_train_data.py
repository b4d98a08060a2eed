"""BELLE dialogue readers/writer (belle_edge.core.dialogues) and the cleaning rules (belle_edge.train.clean)."""
from __future__ import annotations

import json
import os

import pytest

from belle_edge.errors import InputError
from belle_edge.train.clean import CleanConfig, clean_dialogues, clean_file, detect_language, valid_resident_id
from belle_edge.core.dialogues import Dialogue, Turn, parse_record, read_dialogues, write_dialogues

ZH_Q = "请介绍一下北京的名胜古迹。"
ZH_A = "北京有故宫、长城、颐和园和天坛等名胜古迹，每年吸引大量游客前来参观。"
VALID_ID = "11010519491231002X"  # the GB 11643 example number
WRONG_ID = "110105194912310021"  # the same with a wrong check digit


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def conv(*messages, **extra):
    return dump({**extra, "conversations": [{"from": f, "value": v} for f, v in messages]})


def D(*pairs, system=None, id=None) -> Dialogue:
    return Dialogue(tuple(Turn(u, a) for u, a in pairs), system, id)


def clean(dialogues, **config):
    return clean_dialogues(list(dialogues), CleanConfig(**config))


# ------------------------------------------------------------------------------------------------ readers
def test_read_belle_multiturn(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        conv(("system", "你是一个乐于助人的助手。"), ("Human", "你好"), ("GPT", "你好！"), ("user", "再见"),
             ("Bot", "再见！"), id="a1"),
        "",
        "   ",
        conv(("human", "第二条"), ("assistant", "好的"), id=7),
    ])
    got = read_dialogues(path)
    assert got == [
        Dialogue((Turn("你好", "你好！"), Turn("再见", "再见！")), "你是一个乐于助人的助手。", "a1"),
        Dialogue((Turn("第二条", "好的"),), None, "7"),
    ]


def test_read_instruction_format(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", [
        dump({"instruction": "翻译成英文", "input": "你好", "output": "Hello"}),
        dump({"instruction": "写一首诗", "input": "", "output": "床前明月光"}),
        dump({"instruction": "讲个笑话", "output": "好的"}),
        dump({"instruction": "算一下", "input": None, "output": "2"}),
    ])
    assert [d.turns for d in read_dialogues(path)] == [
        (Turn("翻译成英文\n你好", "Hello"),), (Turn("写一首诗", "床前明月光"),), (Turn("讲个笑话", "好的"),),
        (Turn("算一下", "2"),)]


def test_read_json_array_file(tmp_path):
    records = [json.loads(conv(("human", "你好"), ("assistant", "你好！"))),
               {"instruction": "问题", "output": "回答"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_dialogues(str(path)) == [D(("你好", "你好！")), D(("问题", "回答"))]
    (tmp_path / "empty.json").write_text("[]\n", encoding="utf-8")
    assert read_dialogues(str(tmp_path / "empty.json")) == []
    # an error names the line where the bad element starts
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": 3, "output": "b"}\n]\n')
    with pytest.raises(InputError, match=rf"^{bad}:3: field 'instruction': expected a string"):
        read_dialogues(str(bad))


def test_one_sided_and_consecutive_messages(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        conv(("assistant", "欢迎光临"), ("human", "第一句"), ("human", "第二句"), ("assistant", "答一"),
             ("gpt", "答二"), ("human", "没有回答")),
    ])
    [d] = read_dialogues(path)
    assert d.turns == (Turn("", "欢迎光临"), Turn("第一句\n第二句", "答一\n答二"), Turn("没有回答", ""))


def test_write_roundtrip_utf8_atomic(tmp_path):
    dialogues = [D(("你好", "你好！"), ("", "只有回答"), ("只有问题", ""), system="系统", id="x"),
                 D(("a b", "c\u2028d\x85e\x1ef\r\ng"))]  # characters str.splitlines would split on
    path = str(tmp_path / "out.jsonl")
    write_dialogues(dialogues, path)
    raw = open(path, "rb").read().decode("utf-8")
    assert "你好" in raw and "\\u4f60" not in raw and "\u2028" in raw  # not ASCII-escaped
    assert read_dialogues(path) == dialogues
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind
    assert json.loads(raw.splitlines()[0])["conversations"][0] == {"from": "system", "value": "系统"}


def test_dialogue_turns_list_becomes_tuple():
    assert Dialogue([Turn("a", "b")]).turns == (Turn("a", "b"),)


@pytest.mark.parametrize("lines, line, pattern", [
    (['{"conversations": []}', "", '{"instruction": "a", "output": "b"', "{}"], 3, r"invalid JSON"),
    (['{"question": "a", "answer": "b"}'], 1, r"not a known record.*'conversations'.*'instruction'.*answer, question"),
    (['[1, 2]'], 1, r"expected a JSON object"),
    (['{"instruction": "a", "output": 5}'], 1, r"field 'output': expected a string, got a number 5"),
    (['{"instruction": "a"}'], 1, r"field 'output' is missing"),
    ([conv(("human", "a")), conv(("human", "a"), ("assistant", None))], 2,
     r"field 'conversations\[1\]\.value': expected a string, got null"),
    ([conv(("human", "a"), ("robot", "b"))], 1,
     r"field 'conversations\[1\]\.from': expected one of .*got a string 'robot'"),
    ([conv(("human", "a"), ("system", "b"))], 1,
     r"field 'conversations\[1\]\.from': a \"system\" message may only come"),
    (['{"conversations": {"from": "human"}}'], 1, r"field 'conversations': expected an array"),
    (['{"conversations": [{"value": "x"}]}'], 1, r"field 'conversations\[0\]\.from' is missing"),
    (['{"id": [1], "instruction": "a", "output": "b"}'], 1, r"field 'id': expected a string or an integer"),
])
def test_read_errors_name_file_line_and_field(tmp_path, lines, line, pattern):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputError, match=rf"^{path}:{line}: {pattern}") as info:
        read_dialogues(path)
    assert "\n" not in str(info.value)


def test_read_unreadable_files(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=rf"^{missing}: cannot read the dialogue file"):
        read_dialogues(missing)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"instruction": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=r"not UTF-8 text"):
        read_dialogues(str(binary))


def test_parse_record_where_prefix():
    with pytest.raises(InputError, match=r"^x.jsonl:9: "):
        parse_record({"nope": 1}, "x.jsonl:9")


# ------------------------------------------------------------------------------------------------ cleaning rules
def test_normalize_full_width_and_chinese_punctuation():
    dialogues = [
        D(("ＡＢＣ１２３！ＯＫ？ OK，then", "你好，世界！真的吗?!价格：100元；数量3,000，时间12:30。好的!写作……x²"
                                        "，iPhone，我说hello,世界。ＡＢＣ１２３！（注）电话13812345678，13912345678")),
        D((ZH_Q, ZH_A)),  # already normal: not counted
    ]
    out, report = clean(dialogues)
    assert out[0].turns[0] == Turn("ABC123!OK? OK,then", "你好，世界！真的吗？！价格：100元；数量3,000，时间12:30。"
                                                         "好的！写作……x²，iPhone，我说hello，世界。ABC123！(注)"
                                                         "电话<PHONE>，<PHONE>")
    assert out[1] == dialogues[1]
    assert report["rules"]["normalize"] == {"dropped_dialogues": 0, "dropped_turns": 0, "modified": 1}


def test_whitespace():
    answer = "第一行  有  空格\t\t和制表符   \n\n\n\n\n代码：\n    def f():\n        return 1  \n\u200b结束\ufeff"
    out, report = clean([D(("  \u200b你好 \n", answer)), D((ZH_Q, ZH_A))])
    assert out[0].turns[0] == Turn("你好", "第一行 有 空格 和制表符\n\n代码：\n    def f():\n        return 1\n结束")
    assert report["rules"]["whitespace"]["modified"] == 1


def test_pii_email():
    out, report = clean([D(("我的邮箱是 zhang.san+work@mail.example.com。", "好的，已记录 li_si@qq.com 和 13812345678@163.com"))])
    assert out[0].turns[0] == Turn("我的邮箱是 <EMAIL>。", "好的，已记录 <EMAIL> 和 <EMAIL>")
    assert report["rules"]["pii_masked"]["masked"] == {"email": 3, "id": 0, "phone": 0}
    assert report["rules"]["pii_masked"]["modified"] == 1


def test_pii_resident_id_needs_a_valid_check_digit():
    assert valid_resident_id(VALID_ID) and valid_resident_id(VALID_ID.lower()) and not valid_resident_id(WRONG_ID)
    text = f"身份证号{VALID_ID}，另一个{WRONG_ID}，还有{VALID_ID[:-1]}x，长串9{VALID_ID[:-1]}5"
    out, report = clean([D(("帮我核对身份证号", text))])
    assert out[0].turns[0].assistant == f"身份证号<ID>，另一个{WRONG_ID}，还有<ID>，长串9{VALID_ID[:-1]}5"
    assert report["rules"]["pii_masked"]["masked"] == {"email": 0, "id": 2, "phone": 0}


def test_pii_phone_not_inside_a_longer_digit_run():
    text = ("手机13812345678，座机+8613912345678，国际 +86 150-1234-5678，86-18612345678，"
            "订单号2013812345678901，流水138123456789")
    out, report = clean([D(("帮我记下这些号码", text))])
    assert out[0].turns[0].assistant == ("手机<PHONE>，座机<PHONE>，国际 <PHONE>，<PHONE>，"
                                         "订单号2013812345678901，流水138123456789")
    assert report["rules"]["pii_masked"]["masked"] == {"email": 0, "id": 0, "phone": 4}


def test_pii_masking_can_be_turned_off():
    d = D(("我的手机号", "13812345678"))
    out, report = clean([d], mask_pii=False)
    assert out == [d]
    assert report["rules"]["pii_masked"]["enabled"] is False and report["rules"]["pii_masked"]["modified"] == 0


def test_one_sided_turns():
    d = D(("", "欢迎光临本店"), (ZH_Q, ZH_A), ("还有别的吗", "  \u200b "))
    out, report = clean([d])
    assert out == [D((ZH_Q, ZH_A))]
    assert report["rules"]["one_sided_turns"] == {"dropped_dialogues": 0, "dropped_turns": 2, "modified": 0}
    assert report["examples"]["one_sided_turns"] == ["Q: | A: 欢迎光临本店", "Q: 还有别的吗 | A: "]


def test_empty_dialogues():
    out, report = clean([Dialogue(()), D(("只有问题", "")), D(("好", "嗯")), D((ZH_Q, ZH_A))])
    assert out == [D((ZH_Q, ZH_A))]
    rules = report["rules"]
    assert rules["empty_dialogues"]["dropped_dialogues"] == 3 and rules["empty_dialogues"]["dropped_turns"] == 0
    assert rules["one_sided_turns"]["dropped_turns"] == 1 and rules["too_short"]["dropped_turns"] == 1
    assert report["examples"]["empty_dialogues"] == ["(no turns)"] * 3


def test_too_short_in_characters_and_tokens(tiny_tokenizer):
    dialogues = [D(("好", "好的，没问题"), (ZH_Q, ZH_A), ("谢谢你", "不客气"))]
    out, report = clean(dialogues)  # min_tokens=2 characters
    assert out[0].turns == (Turn(ZH_Q, ZH_A), Turn("谢谢你", "不客气"))
    assert report["rules"]["too_short"]["dropped_turns"] == 1 and report["length_unit"] == "characters"
    assert report["examples"]["too_short"] == ["Q: 好 | A: 好的，没问题"]

    n = len(tiny_tokenizer.encode("不客气", add_special_tokens=False).ids)
    out, report = clean_dialogues(dialogues, CleanConfig(min_tokens=n + 1), tokenizer=tiny_tokenizer)
    assert Turn("谢谢你", "不客气") not in out[0].turns and Turn(ZH_Q, ZH_A) in out[0].turns
    assert report["length_unit"] == "tokens"


def test_too_long(tiny_tokenizer):
    short, long = D((ZH_Q, ZH_A)), D((ZH_Q, ZH_A * 3), (ZH_Q, ZH_A), system="系统提示")
    limit = len(ZH_Q) + len(ZH_A)
    out, report = clean([short, long], max_tokens=limit)
    assert out == [short]
    assert report["rules"]["too_long"] == {"dropped_dialogues": 1, "dropped_turns": 2, "modified": 0}
    out, _ = clean([D((ZH_Q, ZH_A), system="系统")], max_tokens=limit)  # the system message counts too
    assert out == []
    tokens = sum(len(tiny_tokenizer.encode(t, add_special_tokens=False).ids) for t in (ZH_Q, ZH_A))
    out, _ = clean_dialogues([short], CleanConfig(max_tokens=tokens), tokenizer=tiny_tokenizer)
    assert out == [short]
    out, _ = clean_dialogues([short], CleanConfig(max_tokens=tokens - 1), tokenizer=tiny_tokenizer)
    assert out == []


def test_language():
    assert detect_language(ZH_A) == "zh" and detect_language("The capital of France is Paris.") == "en"
    assert detect_language("こんにちは、東京へようこそ。") == "other"  # kana: Japanese is not Chinese
    assert detect_language("Привет, как дела?") == "other" and detect_language("1 + 1 = 2") is None
    zh = D((ZH_Q, ZH_A))
    en = D(("What is the capital of France?", "The capital of France is Paris."))
    mixed = D(("用Python写", "可以使用 print 函数输出 hello world 到屏幕"))  # ideographs >= 30% of letters
    ru = D(("Как дела?", "Хорошо, спасибо! А у вас?"))
    ja = D(("挨拶して", "こんにちは、今日はいい天気ですね。"))
    math = D(("1+1等于几？", "1+1=2"))  # no letters in the reply: the question decides (zh)
    out, report = clean([zh, en, mixed, ru, ja, math])
    assert out == [zh, en, mixed, math]
    lang = report["rules"]["language"]
    assert lang["dropped_dialogues"] == 2 and lang["detected"] == {"zh": 3, "en": 1, "other": 2, "none": 0}
    out, _ = clean([zh, en], languages=("zh",))
    assert out == [zh]
    out, report = clean([ru], languages=())
    assert out == [ru] and report["rules"]["language"]["enabled"] is False


def test_exact_duplicates():
    a = D((ZH_Q, ZH_A), system="你是助手")
    same = D((ZH_Q + "  ", ZH_A.replace("，", "， ")), system="你是助手", id="copy")  # same after normalization
    en1, en2 = D(("Hello there", "Hi! How are you?")), D(("hello  THERE", "hi! how are you?"))
    other_system = D((ZH_Q, ZH_A), system="你是导游")
    out, report = clean([a, same, en1, en2, other_system], near_duplicate_threshold=1.0)
    assert out == [a, en1, other_system]
    assert report["rules"]["exact_duplicates"]["dropped_dialogues"] == 2
    assert report["rules"]["near_duplicates"]["dropped_dialogues"] == 0


def test_near_duplicates():
    answer = ("长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。它始建于春秋战国时期，"
              "秦朝统一后连接成万里长城，明朝又大规模重修。如今长城是世界文化遗产，也是中华民族的象征之一。")
    original = D(("请介绍一下长城的历史。", answer))
    one_char = D(("请介绍一下长城的历史。", answer.replace("两万多", "两万余")))
    unrelated = D(("怎样做西红柿炒鸡蛋？", "先把鸡蛋打散炒熟盛出，再炒西红柿出汁，加入鸡蛋翻炒，最后加盐和少许糖调味即可出锅。"
                   "喜欢葱香的话可以撒一点葱花，火候不要太大，鸡蛋要嫩一些才好吃。"))
    out, report = clean([original, one_char, unrelated])
    assert out == [original, unrelated]
    assert report["rules"]["near_duplicates"] == {"dropped_dialogues": 1, "dropped_turns": 1, "modified": 0}
    assert report["examples"]["near_duplicates"] == [("Q: 请介绍一下长城的历史。 | A: " + one_char.turns[0].assistant)[:59] + "…"]
    assert len(report["examples"]["near_duplicates"][0]) == 60


def test_report_counts_add_up():
    dialogues = [D(("ＨＩ", "Hello!"), ("", "x")), D((ZH_Q, ZH_A)), D((ZH_Q, ZH_A)), Dialogue(()),
                 D(("Как дела?", "Хорошо, спасибо!")), D(("我的电话", "13812345678 收到"), (ZH_Q, "  "))]
    out, report = clean(dialogues)
    rules = report["rules"]
    assert list(rules) == ["normalize", "whitespace", "pii_masked", "one_sided_turns", "too_short",
                           "empty_dialogues", "too_long", "language", "exact_duplicates", "near_duplicates"]
    assert set(report["examples"]) == set(list(rules)[3:])
    assert (report["input"], report["output"], report["turns_in"], report["turns_out"]) == (6, 3, 7, 3)
    assert report["input"] - sum(r["dropped_dialogues"] for r in rules.values()) == report["output"] == len(out)
    assert report["turns_in"] - sum(r["dropped_turns"] for r in rules.values()) == report["turns_out"]
    assert rules["normalize"]["modified"] == 1 and rules["pii_masked"]["masked"]["phone"] == 1
    assert rules["one_sided_turns"]["dropped_turns"] == 2 and rules["language"]["dropped_dialogues"] == 1
    assert rules["exact_duplicates"]["dropped_dialogues"] == 1 and rules["empty_dialogues"]["dropped_dialogues"] == 1
    json.dumps(report)  # JSON-serialisable


def test_config_is_checked():
    with pytest.raises(InputError, match="languages: expected codes among zh, en, got 'fr'"):
        CleanConfig(languages=("zh", "fr"))
    with pytest.raises(InputError, match="languages: expected a tuple"):
        CleanConfig(languages="zh")
    with pytest.raises(InputError, match="near_duplicate_threshold"):
        CleanConfig(near_duplicate_threshold=0)
    with pytest.raises(InputError, match="max_tokens"):
        CleanConfig(max_tokens=0)


# ------------------------------------------------------------------------------------------------ clean_file
def test_clean_file(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        conv(("human", ZH_Q), ("assistant", ZH_A + " 电话13812345678"), id="1"),
        conv(("human", ZH_Q), ("assistant", ZH_A + " 电话13812345678"), id="2"),
        dump({"instruction": "Say hi", "output": "Hi！"}),
    ])
    before = open(src, "rb").read()
    out = str(tmp_path / "out.jsonl")
    report = clean_file(src, out)
    assert open(src, "rb").read() == before  # the input is never rewritten
    assert read_dialogues(out) == [D((ZH_Q, ZH_A + " 电话<PHONE>"), id="1"), D(("Say hi", "Hi!"))]
    on_disk = json.loads(open(out + ".report.json", encoding="utf-8").read())
    assert on_disk == report
    assert report["input_file"] == src and report["output_file"] == out
    assert (report["input"], report["output"]) == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "out.jsonl.report.json"]


def test_clean_file_refuses_to_rewrite_its_input(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [conv(("human", ZH_Q), ("assistant", ZH_A))])
    before = open(src, "rb").read()
    os.symlink(src, tmp_path / "link.jsonl")
    for out in (src, str(tmp_path / "." / "in.jsonl"), str(tmp_path / "link.jsonl")):
        with pytest.raises(InputError, match=r"--out must differ from the input; cleaning never rewrites its input$"):
            clean_file(src, out)
    assert open(src, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "link.jsonl"]


def test_clean_file_bad_input_names_the_line(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [conv(("human", ZH_Q), ("assistant", ZH_A)), "{oops"])
    with pytest.raises(InputError, match=rf"^{src}:2: invalid JSON"):
        clean_file(src, str(tmp_path / "out.jsonl"))
    assert not os.path.exists(tmp_path / "out.jsonl")

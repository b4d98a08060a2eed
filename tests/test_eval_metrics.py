"""Reply-quality metrics (belle_edge.evaluate.generation) on examples worked out by hand."""
import subprocess
import sys

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("jieba")

from belle_edge.errors import InputError  # noqa: E402
from belle_edge.evaluate.generation import (bleu4, format_metrics, generation_metrics, lcs_length,  # noqa: E402
                                            rouge_l)

HYP, REF = "我喜欢苹果", "我很喜欢吃苹果"


def test_lcs():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook case (CLRS): BCBA
    assert lcs_length(list(HYP), list(REF)) == 5
    assert lcs_length([], list("abc")) == 0


def test_identical_texts_score_100():
    texts = ["我很喜欢吃苹果", "今天天气很好，我们去公园散步吧。"]
    assert bleu4(texts, texts)["bleu4"] == 100.0
    assert rouge_l(texts, texts, level="char")["rouge_l"] == 100.0
    assert rouge_l(texts, texts, level="word")["rouge_l"] == 100.0


def test_rouge_l_char_by_hand():
    # 我喜欢苹果 vs 我很喜欢吃苹果: LCS = 我喜欢苹果 = 5, P = 5/5, R = 5/7,
    # F1 = 2PR/(P+R) = (10/7)/(12/7) = 5/6 = 0.8333 -> 83.33
    assert rouge_l([HYP], [REF], level="char") == {"rouge_l": 83.33, "level": "char", "scored": 1}
    # whitespace does not count as a character
    assert rouge_l(["我 喜欢\t苹果"], [" 我很喜欢吃 苹果\n"], level="char")["rouge_l"] == 83.33


def test_rouge_l_word_by_hand():
    import jieba

    # jieba 0.42.1, default (accurate, HMM) mode, checked once and fixed here:
    assert jieba.lcut("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]
    assert jieba.lcut("我很喜欢吃苹果") == ["我", "很", "喜欢", "吃", "苹果"]
    assert jieba.lcut("今天天气很好") == ["今天天气", "很", "好"]
    assert jieba.lcut("今天 天气 不错") == ["今天", " ", "天气", " ", "不错"]  # the " " tokens are dropped
    # pair 1: LCS = 我 喜欢 吃 苹果 = 4, P = 4/4, R = 4/5, F1 = 1.6/1.8 = 8/9 = 0.8889
    assert rouge_l(["我喜欢吃苹果"], [REF], level="word")["rouge_l"] == 88.89
    # pair 2: no word in common (今天天气 is one word, 今天 and 天气 two), F1 = 0 ...
    assert rouge_l(["今天天气很好"], ["今天 天气 不错"], level="word")["rouge_l"] == 0.0
    # ... while by characters LCS = 今天天气 = 4, P = 4/6, R = 4/6, F1 = 2/3 -> 66.67
    assert rouge_l(["今天天气很好"], ["今天 天气 不错"], level="char")["rouge_l"] == 66.67
    # macro average over the two pairs: (8/9 + 0) / 2 = 0.4444 -> 44.44
    out = rouge_l(["我喜欢吃苹果", "今天天气很好"], [REF, "今天 天气 不错"], level="word")
    assert out == {"rouge_l": 44.44, "level": "word (jieba)", "scored": 2}


def test_rouge_l_unknown_level():
    with pytest.raises(ValueError, match="'char' or 'word'"):
        rouge_l([HYP], [REF], level="token")


def test_totally_different_hypothesis_scores_0():
    assert rouge_l(["你好"], ["再见"], level="char")["rouge_l"] == 0.0
    assert rouge_l(["你好"], ["再见"], level="word")["rouge_l"] == 0.0
    assert rouge_l([""], ["再见"], level="char")["rouge_l"] == 0.0  # an empty reply scores 0


def test_bleu_matches_sacrebleu():
    from sacrebleu.metrics import BLEU

    hyps = ["我喜欢吃苹果，也喜欢吃香蕉。", "今天天气很好"]
    refs = ["我很喜欢吃苹果和香蕉。", "今天的天气非常好"]
    direct = BLEU(tokenize="zh")
    expected = direct.corpus_score(hyps, [refs])
    out = bleu4(hyps, refs)
    assert out["bleu4"] == round(expected.score, 2)
    assert 0 < out["bleu4"] < 100
    assert out["signature"] == str(direct.get_signature())
    assert "tok:zh" in out["signature"] and "nrefs:1" in out["signature"]
    assert out["scored"] == 2


def test_generation_metrics_excludes_empty_references():
    hyps = [HYP, "随便说点什么", "今天天气很好", "没有参考"]
    refs = [REF, "", "今天 天气 不错", "  \n"]
    m = generation_metrics(hyps, refs)
    assert m["scored"] == 2 and m["empty_references_excluded"] == 2
    kept = ([HYP, "今天天气很好"], [REF, "今天 天气 不错"])
    assert m["bleu4"] == bleu4(*kept)["bleu4"]
    assert m["bleu_signature"] == bleu4(*kept)["signature"]
    # char level: (5/6 + 2/3) / 2 = 0.75 -> 75.0
    assert m["rouge_l_char"] == 75.0
    assert m["rouge_l_word"] == rouge_l(*kept, level="word")["rouge_l"]
    text = format_metrics(m)
    assert "BLEU-4 (sacrebleu, zh tokenisation)" in text and "tok:zh" in text
    assert "ROUGE-L F1, character level: 75.00" in text
    assert "ROUGE-L F1, word level (jieba):" in text
    assert "2 with an empty reference left out" in text


def test_mismatched_lengths_raise_one_line():
    with pytest.raises(InputError) as e:
        generation_metrics(["a", "b", "c"], ["a", "b", "c", "d"])
    assert "3 hypotheses but 4 references" in str(e.value) and "\n" not in str(e.value)
    for fn in (bleu4, lambda h, r: rouge_l(h, r, level="char")):
        with pytest.raises(InputError, match="1 hypotheses but 2 references"):
            fn(["a"], ["a", "b"])


def test_all_references_empty_raise_one_line():
    with pytest.raises(InputError) as e:
        generation_metrics(["你好", "再见"], ["", " "])
    assert "references are empty" in str(e.value) and "\n" not in str(e.value)


def test_jieba_is_lazy_and_quiet():
    # a fresh interpreter: importing the module loads neither library; the first word-level score loads
    # jieba's dictionary without its "Building prefix dict ..." log lines
    code = ("import sys\n"
            "from belle_edge.evaluate import generation as g\n"
            "assert 'jieba' not in sys.modules and 'sacrebleu' not in sys.modules\n"
            "print(g.rouge_l(['我喜欢吃苹果'], ['我很喜欢吃苹果'], level='word')['rouge_l'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "88.89"
    assert out.stderr == ""

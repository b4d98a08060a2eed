"""Streaming text never shows half a character, and holds back what may become a stop string."""
from belle_edge.runtime.detokenizer import IncrementalDetokenizer, find_stop, stop_holdback

TEXT = "你好！订单已经发货了，预计三天内送达。麒麟🌟 Hello, 世界"


def test_streamed_chinese_joins_to_the_full_decode_without_broken_characters(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT).ids
    assert len(ids) > len(TEXT) // 2  # the tiny vocabulary splits most characters into byte tokens
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert any(p == "" for p in pieces), "some tokens end inside a character"
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_clean_boundaries_fall_between_characters(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT).ids
    detok = IncrementalDetokenizer(tiny_tokenizer)
    for i in ids:
        detok.push(i)
    for tokens, chars in detok.clean:
        assert tiny_tokenizer.decode(ids[:tokens]) == TEXT[:chars]
    tokens, chars = detok.boundary(len(ids), 5)
    assert chars <= 5 and tiny_tokenizer.decode(ids[:tokens]) == TEXT[:chars]


def test_stop_strings_are_found_and_their_prefixes_held_back():
    stops = ("Human:", "</s>")
    assert stop_holdback("好的。\n\nHum", stops) == 3
    assert stop_holdback("好的。<", stops) == 1
    assert stop_holdback("好的。", stops) == 0
    assert find_stop("好的。\n\nHuman: 你好", stops) == 5
    assert find_stop("好的。", stops) == -1

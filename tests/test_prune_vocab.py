"""Vocabulary reduction (belle_edge.compile.prune.vocab): the reduced tokenizer splits the chosen corpus exactly as the
original did, still round-trips any other text through the byte tokens, and keeps specials, bytes and merge
ancestors; bad input is refused with one line."""
from __future__ import annotations

import json
import os
import random

import pytest
from conftest import CORPUS, SPECIALS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import belle_edge
from belle_edge.errors import CheckpointError, UnsupportedModelError
from belle_edge.compile.prune.vocab import (VocabTrim, _merge_pair, corpus_token_ids, remap_tokenizer_config,
                                    roundtrip_failures, trim_vocabulary)

ENGLISH = sorted({text for text in CORPUS if text.isascii()})
UNSEEN = ["今天天气很好，我们去公园散步吧。", "这款耳机续航 30 小时，支持蓝牙 5.3 😀👍", "价格：¥199（含税）",
          "emoji only 🎉🚀", "  leading and  double spaces ", "混合 mixed 文本\n第二行"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
DATA = os.path.join(os.path.dirname(belle_edge.__file__), "data")


def _lines(name: str) -> list[str]:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _copy(tok: Tokenizer) -> Tokenizer:
    # the conftest tokenizer is session-wide: tests that change it work on a copy
    return Tokenizer.from_str(tok.to_str())


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _assert_same_split(old: Tokenizer, trim: VocabTrim, texts) -> None:
    for text in texts:
        new = _ids(trim.tokenizer, text)
        assert [trim.old_ids[i] for i in new] == _ids(old, text), text


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    """A LLaMA/SentencePiece-style BPE: ▁ for spaces, <0xNN> tokens in model.vocab (not added tokens),
    byte_fallback, and a Sequence decoder with ByteFallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + BYTES,
                                  limit_alphabet=60)
    tok.train_from_iterator(CORPUS, trainer)
    # the trainer made the byte tokens added tokens; SentencePiece conversions have them in the vocab only
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in BYTES]
    tok = Tokenizer.from_str(json.dumps(spec))
    assert roundtrip_failures(tok, UNSEEN + CORPUS) == []
    return tok


def test_corpus_split_is_identical(tiny_tokenizer):
    corpus = sorted(set(CORPUS))[:4]  # the tokenizer was trained on all six sentences: it needs all its tokens
    keep = corpus_token_ids(tiny_tokenizer, corpus)
    trim = trim_vocabulary(tiny_tokenizer, keep)
    assert keep <= set(trim.old_ids)
    assert list(trim.old_ids) == sorted(set(trim.old_ids))
    assert trim.vocab_size == trim.tokenizer.get_vocab_size(with_added_tokens=True) < 400
    _assert_same_split(tiny_tokenizer, trim, corpus)
    for new, old in enumerate(trim.old_ids):
        assert trim.new_id(old) == new
        assert trim.tokenizer.id_to_token(new) == tiny_tokenizer.id_to_token(old)
    dropped = next(i for i in range(400) if i not in set(trim.old_ids))
    assert trim.new_id(dropped) is None
    assert "VocabTrim(vocab_size=" in repr(trim)


def test_calibration_trim_on_the_chinese_fixtures():
    """A byte-level BPE trained on both Chinese files, cut to what the calibration file (or random parts of it)
    uses: identical splits there, lossless and in range on the held-out file."""
    calibration, held_out = _lines("zh_calibration.txt"), _lines("zh_held_out.txt")
    assert not set(calibration) & set(held_out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(calibration + held_out, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    rng = random.Random(0)
    for corpus in [calibration] + [rng.sample(calibration, 5) for _ in range(3)]:
        trim = trim_vocabulary(tok, corpus_token_ids(tok, corpus))
        assert trim.vocab_size < tok.get_vocab_size()
        _assert_same_split(tok, trim, corpus)
        assert roundtrip_failures(trim.tokenizer, held_out, limit=len(held_out)) == []
        assert max(i for text in held_out for i in _ids(trim.tokenizer, text)) < trim.vocab_size


def test_unseen_text_round_trips_after_english_trim(tiny_tokenizer):
    trim = trim_vocabulary(tiny_tokenizer, corpus_token_ids(tiny_tokenizer, ENGLISH))
    _assert_same_split(tiny_tokenizer, trim, ENGLISH)
    assert trim.covers_all_bytes and trim.missing_bytes == ()
    assert roundtrip_failures(trim.tokenizer, UNSEEN + CORPUS) == []
    for text in UNSEEN:
        ids = _ids(trim.tokenizer, text)
        assert ids and max(ids) < trim.vocab_size
    # the Chinese words the English corpus never used are gone: they now cost more (byte) tokens
    zh = "你好！请问有什么可以帮您？"
    assert len(_ids(trim.tokenizer, zh)) > len(_ids(tiny_tokenizer, zh))


def test_specials_extra_tokens_and_byte_alphabet_are_kept(tiny_tokenizer):
    word = max((t for t in tiny_tokenizer.get_vocab() if t.isascii() and t.isalpha()), key=len)
    trim = trim_vocabulary(tiny_tokenizer, [], extra_tokens=[word, "Human: not a token"])
    vocab = trim.tokenizer.get_vocab()
    assert [vocab[s] for s in SPECIALS] == [0, 1, 2]
    assert all(ch in vocab for ch in pre_tokenizers.ByteLevel.alphabet())
    assert word in vocab
    # nothing but the specials, the bytes and the extra word with its merge ancestors
    assert trim.vocab_size < 3 + 256 + len(word)
    assert [a.content for a in trim.tokenizer.get_added_tokens_decoder().values()] == SPECIALS
    enc = trim.tokenizer.encode("<|im_start|>user\n你好<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2


def test_merge_ancestors_keep_a_long_token_whole(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    old = max((i for t, i in vocab.items() if t not in SPECIALS
               and _ids(tiny_tokenizer, tiny_tokenizer.decode([i])) == [i]),
              key=lambda i: len(tiny_tokenizer.decode([i])))
    trim = trim_vocabulary(tiny_tokenizer, [old])
    text = tiny_tokenizer.decode([old])
    assert len(text) >= 4
    assert [trim.old_ids[i] for i in _ids(trim.tokenizer, text)] == [old]
    # every merge of the reduced tokenizer joins kept tokens into a kept token, in the original rank order
    spec, orig = json.loads(trim.tokenizer.to_str()), json.loads(tiny_tokenizer.to_str())
    merges = [tuple(m) for m in spec["model"]["merges"]]
    assert merges and all(a in spec["model"]["vocab"] and b in spec["model"]["vocab"]
                          and a + b in spec["model"]["vocab"] for a, b in merges)
    rank = {tuple(m): r for r, m in enumerate(orig["model"]["merges"])}
    assert [rank[m] for m in merges] == sorted(rank[m] for m in merges)
    assert len(merges) < len(rank)


def test_byte_fallback_bpe(byte_fallback_tokenizer):
    tok = byte_fallback_tokenizer
    trim = trim_vocabulary(tok, corpus_token_ids(tok, ENGLISH))
    vocab = trim.tokenizer.get_vocab()
    assert all(b in vocab for b in BYTES) and "<unk>" in vocab
    assert json.loads(trim.tokenizer.to_str())["model"]["byte_fallback"] is True
    assert trim.covers_all_bytes
    _assert_same_split(tok, trim, ENGLISH)
    assert roundtrip_failures(trim.tokenizer, UNSEEN + CORPUS) == []
    zh = _ids(trim.tokenizer, "你好")
    assert max(zh) < trim.vocab_size
    assert {trim.tokenizer.id_to_token(i) for i in zh} & set(BYTES)  # the dropped characters went to bytes


def test_without_byte_tokens_the_gap_is_reported():
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    trim = trim_vocabulary(tok, corpus_token_ids(tok, ENGLISH))
    assert not trim.covers_all_bytes and len(trim.missing_bytes) == 256 - 2 - 11  # all but non-UTF-8 bytes
    failures = roundtrip_failures(trim.tokenizer, ["Hello", "客服：好的，我马上为您处理。" * 10, "😀"], limit=1)
    assert failures == [("客服：好的，我马上为您处理。" * 10)[:60]]


def test_a_byte_alphabet_gap_is_reported():
    # a byte-level BPE trained without the full alphabet: it had no token for the bytes of Chinese text before
    # the reduction either, and says which ones
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(ENGLISH, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS))
    trim = trim_vocabulary(tok, corpus_token_ids(tok, ENGLISH[:1]))
    assert 0xE4 in trim.missing_bytes and ord("H") not in trim.missing_bytes and not trim.covers_all_bytes
    assert roundtrip_failures(trim.tokenizer, ["Hello", "你好"]) == ["你好"]
    assert trim_vocabulary(_copy(trim.tokenizer), []).missing_bytes == trim.missing_bytes


def test_post_processor_ids_are_remapped(tiny_tokenizer):
    tok = _copy(tiny_tokenizer)
    tok.add_special_tokens(["<|sep|>"])  # an added token beyond model.vocab, id 400
    sep = tok.token_to_id("<|sep|>")
    assert sep == 400
    template = processors.TemplateProcessing(single="<|im_start|> $A <|sep|>", pair="$A <|sep|> $B:1",
                                             special_tokens=[("<|im_start|>", 1), ("<|sep|>", sep)])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    tok.enable_padding(pad_id=2, pad_token="<|im_end|>")
    keep = corpus_token_ids(tok, ENGLISH)
    assert 2 not in keep  # padding did not leak into the corpus ids
    trim = trim_vocabulary(tok, keep)
    new_sep = trim.new_id(sep)
    assert new_sep == trim.vocab_size - 1 < sep
    assert trim.tokenizer.token_to_id("<|sep|>") == new_sep
    enc = trim.tokenizer.encode(ENGLISH[0])
    assert enc.ids[0] == 1 and enc.ids[-1] == new_sep
    assert [trim.old_ids[i] for i in enc.ids] == tok.encode(ENGLISH[0]).ids
    pair = trim.tokenizer.encode("Hello", "Paris")
    assert pair.ids.count(new_sep) == 1 and max(pair.ids) == new_sep

    roberta = _copy(tiny_tokenizer)
    roberta.add_special_tokens(["<cls>"])
    roberta.post_processor = processors.RobertaProcessing(("<|im_end|>", 2), ("<cls>", 400))
    trim = trim_vocabulary(roberta, [])
    assert json.loads(trim.tokenizer.to_str())["post_processor"]["cls"] == ["<cls>", trim.vocab_size - 1]


def test_added_token_below_a_model_token_keeps_its_id():
    # a vocabulary with a gap: tokenizers numbers the model-less added token into it (id 4, below "c" at 5)
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None,
            "added_tokens": [{"id": 9, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {"a": 0, "b": 1, "ab": 2, "c": 5}, "merges": ["a b"]}}
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.token_to_id("<x>") == 4
    assert trim_vocabulary(tok, [5]).old_ids == (4, 5)  # "c" has no ancestors; the added token always stays
    trim = trim_vocabulary(tok, [2, 5])
    assert trim.old_ids == (0, 1, 2, 4, 5)
    assert [trim.tokenizer.id_to_token(i) for i in range(5)] == ["a", "b", "ab", "<x>", "c"]
    assert trim.tokenizer.encode("ab<x>c").ids == [2, 3, 4]
    with pytest.raises(CheckpointError, match=r"^tokenizer: token id 3 names no token"):
        trim_vocabulary(tok, [3])


def test_non_bpe_is_refused_in_one_line():
    tok = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UnsupportedModelError) as err:
        trim_vocabulary(tok, [0], where="models/foo")
    assert str(err.value) == "models/foo: vocabulary reduction supports BPE tokenizers, got WordLevel"


def test_bad_ids_are_refused(tiny_tokenizer):
    with pytest.raises(CheckpointError) as err:
        trim_vocabulary(tiny_tokenizer, [5, 1_000_000], where="ckpt/tokenizer.json")
    assert str(err.value) == "ckpt/tokenizer.json: token id 1000000 is outside the vocabulary (size 400)"
    with pytest.raises(CheckpointError, match=r"token id -1 is outside"):
        trim_vocabulary(tiny_tokenizer, [-1])
    with pytest.raises(CheckpointError, match=r"'7' is not an integer"):
        trim_vocabulary(tiny_tokenizer, ["7"])


def test_remap_tokenizer_config(tiny_tokenizer):
    tok = _copy(tiny_tokenizer)
    tok.add_special_tokens(["<|sep|>"])
    trim = trim_vocabulary(tok, corpus_token_ids(tok, ENGLISH))
    dropped = next(i for i in range(400) if trim.new_id(i) is None)
    entry = {"content": "<|sep|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    cfg = {"eos_token": "<|im_end|>",
           "added_tokens_decoder": {"2": {"content": "<|im_end|>", "special": True}, "400": entry,
                                    str(dropped): {"content": tok.id_to_token(dropped), "special": False}}}
    out = remap_tokenizer_config(cfg, trim)
    assert out["added_tokens_decoder"] == {"2": {"content": "<|im_end|>", "special": True},
                                           str(trim.vocab_size - 1): entry}
    assert out["eos_token"] == "<|im_end|>"
    assert "400" in cfg["added_tokens_decoder"]  # the input is left alone
    assert remap_tokenizer_config({"eos_token": "x"}, trim) == {"eos_token": "x"}
    with pytest.raises(CheckpointError, match=r"key 'eos' is not a token id"):
        remap_tokenizer_config({"added_tokens_decoder": {"eos": {}}}, trim)
    with pytest.raises(CheckpointError, match=r"gives id 2 to '<\|im_start\|>'"):
        remap_tokenizer_config({"added_tokens_decoder": {"2": {"content": "<|im_start|>"}}}, trim)


def test_merges_in_either_form():
    assert _merge_pair(["a b", "c"], "t") == ("a b", "c")  # the list form can hold a space
    assert _merge_pair("Ġt he", "t") == ("Ġt", "he")
    with pytest.raises(CheckpointError, match=r"^t: merge 'a b c' is not a pair of tokens$"):
        _merge_pair("a b c", "t")

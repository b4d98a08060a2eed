"""Vocabulary reduction: keep only the tokens a corpus needs, with new contiguous ids.

BLOOM-family chat models (BELLE-7B) carry a 250,880-token vocabulary, about a billion embedding parameters,
most of which a Chinese chat deployment never uses. ``trim_vocabulary`` rewrites a Hugging Face ``tokenizers``
BPE tokenizer to a chosen subset of tokens, renumbered 0..n-1 in the original order; the caller gathers the
embedding (and LM head) rows with ``VocabTrim.old_ids``.

Why the result still works on any text: BPE builds every token by merges from single symbols, so keeping the
merge ancestors of every kept token (and exactly the merges among kept tokens, in their original ranks) makes
the reduced tokenizer split corpus text exactly as before; text outside the corpus falls back to shorter
tokens and, at the bottom, to the byte alphabet (ByteLevel) or the ``<0xNN>`` tokens (``byte_fallback``), which
are always kept. ``VocabTrim.covers_all_bytes`` / ``missing_bytes`` say whether that bottom is complete;
``roundtrip_failures`` checks actual texts.
"""
from __future__ import annotations

import copy
import json
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Iterator

from tokenizers import Tokenizer, pre_tokenizers

from ...errors import CheckpointError, UnsupportedModelError

_BATCH = 256  # texts per encode_batch call: parallel enough, and a huge corpus never sits in memory at once
_FALLBACK_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))  # the spelling tokenizers' byte_fallback looks up
# bytes valid UTF-8 can hold: never 0xC0, 0xC1 (overlong) or 0xF5..0xFF (beyond U+10FFFF); vocabularies that
# lack those lose nothing
_UTF8_BYTES = tuple(b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5)


@dataclass(frozen=True, repr=False)
class VocabTrim:
    """A reduced tokenizer and where its ids came from."""

    tokenizer: Tokenizer  # the rewritten tokenizer, ids 0..n-1
    old_ids: tuple[int, ...]  # new id i was old id old_ids[i]; ascending, so the original order is kept

    @cached_property
    def _new_of_old(self) -> dict[int, int]:
        # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass
        return {old: new for new, old in enumerate(self.old_ids)}

    def new_id(self, old: int) -> int | None:
        """The new id of old id ``old``; None when that token was dropped."""
        return self._new_of_old.get(old)

    @property
    def vocab_size(self) -> int:
        """Number of tokens (and embedding rows) after the reduction."""
        return len(self.old_ids)

    @cached_property
    def missing_bytes(self) -> tuple[int, ...]:
        """Byte values UTF-8 text can contain that have no token (no ByteLevel char, no ``<0xNN>``): text with
        them loses them (or gets ``<unk>``). The reduction keeps every byte token the original had, so a gap
        here was in the original too; without ByteLevel or byte_fallback every byte counts as missing."""
        spec = json.loads(self.tokenizer.to_str())
        vocab = spec["model"]["vocab"]
        have: set[int] = set()
        if _is_byte_level(spec):
            have.update(b for b, ch in enumerate(_byte_level_chars()) if ch in vocab)
        if spec["model"].get("byte_fallback"):
            have.update(b for b, t in enumerate(_FALLBACK_BYTES) if t in vocab)
        return tuple(b for b in _UTF8_BYTES if b not in have)

    @property
    def covers_all_bytes(self) -> bool:
        """True when every character has a way in (its own token or its bytes' tokens), so nothing becomes
        ``<unk>`` or vanishes; a normalizer may still change text, which ``roundtrip_failures`` catches."""
        return not self.missing_bytes

    def __repr__(self) -> str:
        # the default repr would print the whole tokenizer and every id
        return f"VocabTrim(vocab_size={self.vocab_size})"


def corpus_token_ids(tokenizer: Tokenizer, texts: Iterable[str]) -> set[int]:
    """Ids the tokenizer produces on these texts (no special tokens added, no truncation or padding)."""
    tok = _without_truncation_or_padding(tokenizer)
    ids: set[int] = set()
    for batch in _batches(texts):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            ids.update(enc.ids)
    return ids


def trim_vocabulary(tokenizer: Tokenizer, keep: Iterable[int], *, extra_tokens: Iterable[str] = (),
                    where: str = "tokenizer") -> VocabTrim:
    """A copy of ``tokenizer`` holding only the tokens in ``keep`` plus those it cannot work without.

    Always kept besides ``keep``: every added token (specials, chat markers), the ``extra_tokens`` found in the
    vocabulary, the unk token, the token ids the post-processor and padding name, the byte alphabet (ByteLevel)
    or the ``<0xNN>`` tokens (byte_fallback), and the merge ancestors of all of these. ``extra_tokens`` are
    spelled as the vocabulary spells them (ByteLevel writes a space as "Ġ"); text that is no single token is
    ignored, so put a chat format's text in the corpus instead. ``where`` names the tokenizer in error
    messages. Only BPE models are supported.
    """
    bpe = _Bpe.read(tokenizer, where)
    kept = bpe.required_tokens(keep, extra_tokens)
    bpe.close_under_merges(kept)
    old_ids = bpe.rewrite(kept)
    return VocabTrim(tokenizer=bpe.load(old_ids), old_ids=old_ids)


class _Bpe:
    """A BPE tokenizer's JSON spec, rewritten in place to a subset of its tokens: read -> the tokens required
    -> closed under merges -> rewritten with new ids -> loaded and checked."""

    def __init__(self, spec: dict, size: int, where: str):
        self.spec, self.size, self.where = spec, size, where
        self.model = spec["model"]
        self.vocab: dict[str, int] = self.model.get("vocab") or {}
        self.added: list[dict[str, Any]] = spec.get("added_tokens") or []
        self.token_of: dict[int, str] = {}
        for token, i in self.vocab.items():
            if i in self.token_of:
                raise CheckpointError(f"{where}: model.vocab gives id {i} to both {self.token_of[i]!r} and {token!r}")
            self.token_of[i] = token
        for entry in self.added:
            i, content = entry["id"], entry["content"]
            if self.token_of.get(i, content) != content:
                raise CheckpointError(f"{where}: added token {content!r} has id {i}, which model.vocab gives to "
                                      f"{self.token_of[i]!r}")
            self.token_of[i] = content
        self.id_of = {token: i for i, token in self.token_of.items()}
        self.prefix_len = len(self.model.get("continuing_subword_prefix") or "")
        self.raw_merges = self.model.get("merges") or []
        self.pairs = [_merge_pair(m, where) for m in self.raw_merges]

    @classmethod
    def read(cls, tokenizer: Tokenizer, where: str) -> "_Bpe":
        spec = json.loads(tokenizer.to_str())
        kind = (spec.get("model") or {}).get("type")
        if kind != "BPE":
            raise UnsupportedModelError(f"{where}: vocabulary reduction supports BPE tokenizers, got {kind}")
        return cls(spec, tokenizer.get_vocab_size(with_added_tokens=True), where)

    def known(self, i: Any, what: str) -> int:
        try:
            i = operator.index(i)  # numpy and torch integers are fine, floats and strings are not
        except TypeError:
            raise CheckpointError(f"{self.where}: {what} {i!r} is not an integer") from None
        if i not in self.token_of:
            if 0 <= i < self.size:
                raise CheckpointError(f"{self.where}: {what} {i} names no token (the vocabulary has a gap there)")
            raise CheckpointError(f"{self.where}: {what} {i} is outside the vocabulary (size {self.size})")
        return i

    def required_tokens(self, keep: Iterable[int], extra_tokens: Iterable[str]) -> set[str]:
        """``keep`` and everything the tokenizer cannot work without (see trim_vocabulary)."""
        kept = {self.token_of[self.known(i, "token id")] for i in keep}
        kept.update(entry["content"] for entry in self.added)
        for token in extra_tokens:
            if not isinstance(token, str):
                raise CheckpointError(f"{self.where}: extra token {token!r} is not a string")
            if token in self.id_of:  # unknown ones are fine: a chat format's text need not be one token
                kept.add(token)
        if self.model.get("unk_token") in self.id_of:
            kept.add(self.model["unk_token"])
        if _is_byte_level(self.spec):
            kept.update(ch for ch in pre_tokenizers.ByteLevel.alphabet() if ch in self.id_of)
        if self.model.get("byte_fallback"):
            kept.update(t for t in _FALLBACK_BYTES if t in self.id_of)
        # the post-processor inserts these ids itself and padding appends its pad id: they must survive
        for i in _processor_ids(self.spec.get("post_processor")):
            kept.add(self.token_of[self.known(i, "post_processor token id")])
        padding = self.spec.get("padding")
        if padding and padding.get("pad_id") in self.token_of:
            kept.add(self.token_of[padding["pad_id"]])
        return kept

    def close_under_merges(self, kept: set[str]) -> None:
        """Merge ancestry: BPE reaches a token only through the merges that produce it, so every part of every
        merge producing a kept token is kept too (all of them, not one path: a kept token's text may be split
        either way before merging). tokenizers forms a merge's result as a + b minus b's continuing-subword
        prefix."""
        producers: dict[str, list[tuple[str, str]]] = {}
        for a, b in self.pairs:
            producers.setdefault(a + b[self.prefix_len:], []).append((a, b))
        stack = list(kept)
        while stack:
            for pair in producers.get(stack.pop(), ()):
                for part in pair:
                    if part in kept:
                        continue
                    if part not in self.id_of:
                        raise CheckpointError(f"{self.where}: merge {' '.join(pair)!r} uses {part!r}, which is not "
                                              "in the vocabulary")
                    kept.add(part)
                    stack.append(part)

    def rewrite(self, kept: set[str]) -> tuple[int, ...]:
        """Rewrite the spec to the kept tokens, renumbered in their original order; returns the old ids."""
        old_ids = tuple(sorted(self.id_of[t] for t in kept))
        new_of = {old: new for new, old in enumerate(old_ids)}
        new_vocab = {token: new_of[i] for token, i in self.vocab.items() if i in new_of}
        # tokenizers ignores the ids written for added tokens that are not in model.vocab and numbers them after
        # the model's vocabulary; one that now sits below a model token must move into model.vocab to keep its id
        top = max(new_vocab.values(), default=-1)
        for entry in self.added:
            new = new_of[entry["id"]]
            if entry["content"] not in self.vocab and new < top:
                new_vocab[entry["content"]] = new
        self.model["vocab"] = dict(sorted(new_vocab.items(), key=lambda kv: kv[1]))
        # keep exactly the merges among kept tokens, in rank order and in the form (list or "a b") they were read
        self.model["merges"] = [raw for raw, (a, b) in zip(self.raw_merges, self.pairs)
                                if a in kept and b in kept and a + b[self.prefix_len:] in kept]
        for entry in self.added:
            entry["id"] = new_of[entry["id"]]
        self.added.sort(key=lambda entry: entry["id"])  # tokenizers numbers model-less added tokens in list order
        if self.spec.get("post_processor"):
            _remap_processor(self.spec["post_processor"], new_of)
        padding = self.spec.get("padding")
        if padding and padding.get("pad_id") in new_of:
            padding["pad_id"] = new_of[padding["pad_id"]]
        return old_ids

    def load(self, old_ids: tuple[int, ...]) -> Tokenizer:
        """The rewritten tokenizer, checked to number every token as written (the id map is the point)."""
        where = self.where
        try:
            reduced = Tokenizer.from_str(json.dumps(self.spec, ensure_ascii=False))
        except Exception as e:  # tokenizers raises plain Exception; its text can span lines
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{where}: the reduced tokenizer does not load ({first})") from e
        if reduced.get_vocab_size(with_added_tokens=True) != len(old_ids):
            raise CheckpointError(f"{where}: the reduced tokenizer has {reduced.get_vocab_size(with_added_tokens=True)}"
                                  f" tokens, expected {len(old_ids)}")
        for new, old in enumerate(old_ids):
            if reduced.id_to_token(new) != self.token_of[old]:
                raise CheckpointError(f"{where}: the reduced tokenizer gives id {new} to {reduced.id_to_token(new)!r},"
                                      f" expected {self.token_of[old]!r}")
        return reduced


def remap_tokenizer_config(tok_cfg: dict, trim: VocabTrim) -> dict:
    """A copy of tokenizer_config.json's dict with ``added_tokens_decoder`` (keys: old ids as strings) re-keyed
    to the new ids; entries of dropped tokens are left out."""
    cfg = copy.deepcopy(tok_cfg)
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None:
        return cfg
    if not isinstance(decoder, dict):
        raise CheckpointError("tokenizer_config.json: added_tokens_decoder is not an object")
    out: dict[str, Any] = {}
    for key, entry in decoder.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise CheckpointError(f"tokenizer_config.json: added_tokens_decoder key {key!r} is not a token id")
        new = trim.new_id(int(key))
        if new is None:
            continue
        content = entry.get("content") if isinstance(entry, dict) else None
        have = trim.tokenizer.id_to_token(new)
        if content is not None and have != content:  # the config contradicts tokenizer.json
            raise CheckpointError(f"tokenizer_config.json: added_tokens_decoder gives id {key} to {content!r}, "
                                  f"but the tokenizer has {have!r} there")
        out[str(new)] = entry
    cfg["added_tokens_decoder"] = dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    return cfg


def roundtrip_failures(tokenizer: Tokenizer, texts: Iterable[str], limit: int = 5) -> list[str]:
    """Texts (their first 60 chars) whose decode(encode(text)) != text, at most ``limit`` of them."""
    if limit <= 0:
        return []
    tok = _without_truncation_or_padding(tokenizer)
    bad: list[str] = []
    for batch in _batches(texts):
        encodings = tok.encode_batch(batch, add_special_tokens=False)
        # keep special tokens: a text that contains one must come back with it
        decoded = tok.decode_batch([enc.ids for enc in encodings], skip_special_tokens=False)
        for text, back in zip(batch, decoded):
            if back != text:
                bad.append(text[:60])
                if len(bad) >= limit:
                    return bad
    return bad


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _without_truncation_or_padding(tokenizer: Tokenizer) -> Tokenizer:
    # truncation would hide tokens and padding would invent them; copy only when needed (a copy of a
    # 250k-token tokenizer costs a second) and leave the caller's tokenizer as it is
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def _merge_pair(merge: Any, where: str) -> tuple[str, str]:
    # tokenizers >= 0.20 writes ["a", "b"]; older files hold "a b" (which cannot express a space in a token)
    if isinstance(merge, str):
        parts = merge.split(" ")
    elif isinstance(merge, list):
        parts = merge
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise CheckpointError(f"{where}: merge {merge!r} is not a pair of tokens")
    return parts[0], parts[1]


def _byte_level_chars() -> list[str]:
    """The ByteLevel char of each byte value (GPT-2's table: printable bytes stand for themselves, the others
    for chr(256 + k)); ``ByteLevel.alphabet()`` gives the same chars but unordered."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _is_byte_level(spec: dict) -> bool:
    """Whether the pre-tokenizer (or the normalizer), possibly inside a Sequence, is ByteLevel."""
    def walk(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(walk(child) for key in ("pretokenizers", "normalizers") for child in node.get(key) or ())
    return walk(spec.get("pre_tokenizer")) or walk(spec.get("normalizer"))


def _processor_ids(proc: Any) -> list[Any]:
    """Token ids a post-processor inserts (TemplateProcessing, Roberta/Bert, nested in Sequence)."""
    if not isinstance(proc, dict):
        return []
    kind = proc.get("type")
    if kind == "Sequence":
        return [i for child in proc.get("processors") or () for i in _processor_ids(child)]
    if kind == "TemplateProcessing":
        return [i for special in (proc.get("special_tokens") or {}).values() for i in special.get("ids") or ()]
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [proc[key][1] for key in ("sep", "cls") if proc.get(key)]
    return []


def _remap_processor(proc: Any, new_of: dict[int, int]) -> None:
    """Rewrite, in place, the ids ``_processor_ids`` found (all of them were kept)."""
    if not isinstance(proc, dict):
        return
    kind = proc.get("type")
    if kind == "Sequence":
        for child in proc.get("processors") or ():
            _remap_processor(child, new_of)
    elif kind == "TemplateProcessing":
        for special in (proc.get("special_tokens") or {}).values():
            special["ids"] = [new_of[i] for i in special.get("ids") or ()]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            if proc.get(key):
                proc[key] = [proc[key][0], new_of[proc[key][1]]]

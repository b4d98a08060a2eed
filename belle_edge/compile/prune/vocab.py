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
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise UnsupportedModelError(f"{where}: vocabulary reduction supports BPE tokenizers, got {kind}")
    vocab: dict[str, int] = model.get("vocab") or {}
    added: list[dict[str, Any]] = spec.get("added_tokens") or []

    token_of: dict[int, str] = {}
    for token, i in vocab.items():
        if i in token_of:
            raise CheckpointError(f"{where}: model.vocab gives id {i} to both {token_of[i]!r} and {token!r}")
        token_of[i] = token
    for entry in added:
        i, content = entry["id"], entry["content"]
        if token_of.get(i, content) != content:
            raise CheckpointError(f"{where}: added token {content!r} has id {i}, which model.vocab gives to "
                                  f"{token_of[i]!r}")
        token_of[i] = content
    id_of = {token: i for i, token in token_of.items()}
    size = tokenizer.get_vocab_size(with_added_tokens=True)

    def known(i: Any, what: str) -> int:
        try:
            i = operator.index(i)  # numpy and torch integers are fine, floats and strings are not
        except TypeError:
            raise CheckpointError(f"{where}: {what} {i!r} is not an integer") from None
        if i not in token_of:
            if 0 <= i < size:
                raise CheckpointError(f"{where}: {what} {i} names no token (the vocabulary has a gap there)")
            raise CheckpointError(f"{where}: {what} {i} is outside the vocabulary (size {size})")
        return i

    kept_tokens = {token_of[known(i, "token id")] for i in keep}
    kept_tokens.update(entry["content"] for entry in added)
    for token in extra_tokens:
        if not isinstance(token, str):
            raise CheckpointError(f"{where}: extra token {token!r} is not a string")
        if token in id_of:  # unknown ones are fine: a chat format's text need not be one token
            kept_tokens.add(token)
    unk = model.get("unk_token")
    if unk in id_of:
        kept_tokens.add(unk)
    if _is_byte_level(spec):
        kept_tokens.update(ch for ch in pre_tokenizers.ByteLevel.alphabet() if ch in id_of)
    if model.get("byte_fallback"):
        kept_tokens.update(t for t in _FALLBACK_BYTES if t in id_of)
    # the post-processor inserts these ids itself and padding appends its pad id: they must survive
    for i in _processor_ids(spec.get("post_processor")):
        kept_tokens.add(token_of[known(i, "post_processor token id")])
    padding = spec.get("padding")
    if padding and padding.get("pad_id") in token_of:
        kept_tokens.add(token_of[padding["pad_id"]])

    # Merge ancestry: BPE reaches a token only through the merges that produce it, so every part of every merge
    # producing a kept token is kept too (all of them, not one path: a kept token's text may be split either
    # way before merging). tokenizers forms a merge's result as a + b minus b's continuing-subword prefix.
    prefix_len = len(model.get("continuing_subword_prefix") or "")
    raw_merges = model.get("merges") or []
    pairs = [_merge_pair(m, where) for m in raw_merges]
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in pairs:
        producers.setdefault(a + b[prefix_len:], []).append((a, b))
    stack = list(kept_tokens)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                if part not in kept_tokens:
                    if part not in id_of:
                        raise CheckpointError(f"{where}: merge {' '.join(pair)!r} uses {part!r}, which is not in "
                                              "the vocabulary")
                    kept_tokens.add(part)
                    stack.append(part)

    old_ids = tuple(sorted(id_of[t] for t in kept_tokens))
    new_of = {old: new for new, old in enumerate(old_ids)}

    new_vocab = {token: new_of[i] for token, i in vocab.items() if i in new_of}
    # tokenizers ignores the ids written for added tokens that are not in model.vocab and numbers them after
    # the model's vocabulary; one that now sits below a model token must move into model.vocab to keep its id
    top = max(new_vocab.values(), default=-1)
    for entry in added:
        new = new_of[entry["id"]]
        if entry["content"] not in vocab and new < top:
            new_vocab[entry["content"]] = new
    model["vocab"] = dict(sorted(new_vocab.items(), key=lambda kv: kv[1]))
    # keep exactly the merges among kept tokens, in rank order and in the form (list or "a b") they were read
    model["merges"] = [raw for raw, (a, b) in zip(raw_merges, pairs)
                       if a in kept_tokens and b in kept_tokens and a + b[prefix_len:] in kept_tokens]
    for entry in added:
        entry["id"] = new_of[entry["id"]]
    added.sort(key=lambda entry: entry["id"])  # tokenizers numbers model-less added tokens in list order
    if spec.get("post_processor"):
        _remap_processor(spec["post_processor"], new_of)
    if padding and padding.get("pad_id") in new_of:
        padding["pad_id"] = new_of[padding["pad_id"]]

    try:
        reduced = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    except Exception as e:  # tokenizers raises plain Exception; its text can span lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: the reduced tokenizer does not load ({first})") from e
    # the whole point is the id map: check tokenizers numbered every token as written
    if reduced.get_vocab_size(with_added_tokens=True) != len(old_ids):
        raise CheckpointError(f"{where}: the reduced tokenizer has {reduced.get_vocab_size(with_added_tokens=True)}"
                              f" tokens, expected {len(old_ids)}")
    for new, old in enumerate(old_ids):
        if reduced.id_to_token(new) != token_of[old]:
            raise CheckpointError(f"{where}: the reduced tokenizer gives id {new} to {reduced.id_to_token(new)!r},"
                                  f" expected {token_of[old]!r}")
    return VocabTrim(tokenizer=reduced, old_ids=old_ids)


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

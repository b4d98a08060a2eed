"""Cleaning BELLE dialogue data before fine-tuning: normalization, PII masking, filters and de-duplication.

``clean_dialogues`` applies these rules in this order (the order of the report's "rules"); dialogues keep their
input order, and of a set of duplicates the first is kept. Rules that modify text:

- normalize: Unicode NFKC on every message (full-width ASCII letters, digits and punctuation become half-width:
  "ＡＢＣ１２３！" -> "ABC123!"), then the Chinese punctuation rule below. Kept as written: "…" (NFKC would make
  the Chinese ellipsis "……" into "......") and superscript/subscript digits (NFKC would make "x²" into "x2").
- whitespace: "\\r\\n" and "\\r" -> "\\n"; zero-width characters (U+200B..U+200D, U+2060, U+FEFF) removed; in
  each line, trailing spaces/tabs removed and runs of spaces/tabs between words collapsed to one space, while a
  line's *leading* indentation is kept (code in answers stays valid); 3+ newlines -> 2; each message stripped.
- pii_masked (when ``mask_pii``): e-mail addresses -> "<EMAIL>"; 18-character resident ID numbers (GB 11643:
  6-digit area, a plausible birth date 18xx..20xx, 3 digits, a check digit 0-9/X that must be right; not inside
  a longer digit run) -> "<ID>"; mainland China mobile numbers (1[3-9] + 9 digits, also written 3-4-4 with "-"
  or " ", optional "+86"/"0086"/"86-" prefix; not inside a longer digit run) -> "<PHONE>". Applied in that
  order, so "13812345678@qq.com" is one e-mail.

Rules that drop turns or dialogues:

- one_sided_turns: turns whose user or assistant side is empty.
- too_short: turns with a side shorter than ``min_tokens``.
- empty_dialogues: dialogues with no turn left (none in the input, or all dropped by the two rules above; it runs
  after both so that every emptied dialogue is counted here).
- too_long: dialogues longer than ``max_tokens`` (system + every user and assistant message).
- language: dialogues whose assistant text is in none of ``languages`` (see ``detect_language``). When the
  assistant text has no letters the whole dialogue is looked at; when that has none either, it is kept.
  ``languages=()`` turns the rule off.
- exact_duplicates: dialogues whose content (system and all messages, case-folded, whitespace removed, message
  boundaries kept) equals that of an earlier kept dialogue.
- near_duplicates: dialogues whose MinHash (128 permutations, fixed seed, character 5-gram shingles of the same
  case-folded, whitespace-free content) matches a kept dialogue: candidates come from a ``datasketch.MinHashLSH``
  index built 0.1 below the threshold (for recall) and are confirmed when the MinHash Jaccard estimate is
  >= ``near_duplicate_threshold``. A one-character edit changes up to 5 shingles, so at 0.85 it is caught in
  dialogues of about 65 characters or more.

Lengths are tokenizer tokens (``tokenizer.encode(text, add_special_tokens=False)``) when a ``tokenizers.Tokenizer``
is given, characters otherwise.

Chinese punctuation rule (part of normalize). NFKC would turn the full-width Chinese marks "，！？：；" into ASCII
",!?:;" (it leaves "。、" alone). Instead, per message:

- in a message with at least one CJK ideograph, "，！？：；" are kept as written, and an ASCII ",!?:;" becomes
  full-width when the character directly before or after it is an ideograph or full-width CJK punctuation
  ("，。！？：；、…《》「」『』【】〈〉〔〕"; one just converted counts, so "吗?!" -> "吗？！");
- in a message without ideographs, NFKC applies to them too ("ＡＢＣ１２３！" -> "ABC123!", "OK，then" ->
  "OK,then").

So "你好，世界！", "数量3,000，时间12:30" and "电话13812345678，13912345678" keep their marks, ASCII marks written
against Chinese ("好的!", "hello,世界") take the Chinese form, and "3,000" and "12:30" keep ASCII. Full-width
letters and digits always become ASCII ("你好ＡＢＣ！" -> "你好ABC！"). Parentheses and other marks become
half-width as NFKC makes them ("（注）" -> "(注)").

Report (a JSON-serialisable dict)::

    {
      "input": 1000, "output": 870,            # dialogues in / out
      "turns_in": 2400, "turns_out": 2050,     # turns in / out
      "length_unit": "tokens" | "characters",
      "config": {"min_tokens": 2, "max_tokens": 2048, "near_duplicate_threshold": 0.85,
                 "languages": ["zh", "en"], "mask_pii": true},
      "rules": {                               # every rule, in the order applied, always all three counters
        "normalize":        {"dropped_dialogues": 0, "dropped_turns": 0, "modified": 12},
        "whitespace":       {"dropped_dialogues": 0, "dropped_turns": 0, "modified": 40},
        "pii_masked":       {"dropped_dialogues": 0, "dropped_turns": 0, "modified": 3, "enabled": true,
                             "masked": {"email": 1, "id": 1, "phone": 2}},    # items masked per kind
        "one_sided_turns":  {"dropped_dialogues": 0, "dropped_turns": 30, "modified": 0},
        "too_short":        {...}, "empty_dialogues": {...}, "too_long": {...},
        "language":         {..., "enabled": true,
                             "detected": {"zh": 900, "en": 60, "other": 5, "none": 1}},  # dialogues it looked at
        "exact_duplicates": {...}, "near_duplicates": {...}
      },
      "examples": {                            # the dropping rules only: up to 3 of what each dropped,
        "one_sided_turns": ["Q: 你好 | A: "],     # "Q: <user> | A: <assistant>" of the (first) turn,
        ...                                    # newlines shown as " ", cut to 60 characters ("…" when cut)
      }
    }

"modified" counts dialogues a rule changed. "dropped_turns" counts every turn a rule removed, those of the
dialogues it dropped included, so ``input - sum(dropped_dialogues) == output`` and
``turns_in - sum(dropped_turns) == turns_out``. Masking runs before any example is taken, so with ``mask_pii``
examples show "<PHONE>" etc., never the number. ``clean_file`` adds "input_file" and "output_file" and writes the report as ``<out>.report.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from ..core.dialogues import Dialogue, Turn, read_dialogues, write_dialogues
from ..core.folders import write_text_atomic
from ..errors import InputError, MissingDependencyError
from ..text_patterns import EMAIL, PHONE, RESIDENT_ID, valid_resident_id

RULES = ("normalize", "whitespace", "pii_masked", "one_sided_turns", "too_short", "empty_dialogues", "too_long",
         "language", "exact_duplicates", "near_duplicates")
DROP_RULES = RULES[3:]
LANGUAGES = ("zh", "en")
NUM_PERM = 128
MINHASH_SEED = 20230401  # fixed: the same data always gives the same result
SHINGLE = 5  # characters per shingle
EXAMPLES = 3
EXAMPLE_CHARS = 60


@dataclass(frozen=True)
class CleanConfig:
    min_tokens: int = 2  # per turn side, in tokenizer tokens (characters when no tokenizer)
    max_tokens: int = 2048  # per dialogue (system + user + assistant, all turns)
    near_duplicate_threshold: float = 0.85  # MinHash Jaccard estimate on character 5-gram shingles
    languages: tuple[str, ...] = LANGUAGES  # keep dialogues whose assistant text is mostly in one of these; () = off
    mask_pii: bool = True

    def __post_init__(self):
        if isinstance(self.languages, str):
            raise InputError(f"languages: expected a tuple of language codes such as ('zh', 'en'), got the string "
                             f"{self.languages!r}")
        object.__setattr__(self, "languages", tuple(self.languages))
        unknown = [code for code in self.languages if code not in LANGUAGES]
        if unknown:
            raise InputError(f"languages: expected codes among {', '.join(LANGUAGES)}, "
                             f"got {', '.join(map(repr, unknown))}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InputError(f"min_tokens: expected an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        t = self.near_duplicate_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise InputError(f"near_duplicate_threshold: expected a number in (0, 1], got {t!r}")


# ------------------------------------------------------------------------------------------------ normalize
_PROTECTED = "\u2026\u00b2\u00b3\u00b9\u2070-\u209f"  # kept through NFKC: "…", super/subscript digits
_FULL_WIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；"}
_CHINESE_MARKS = "".join(_FULL_WIDTH.values())  # the full-width marks NFKC would turn into ASCII
_KEEP_PLAIN = re.compile(f"[{_PROTECTED}]")
_KEEP_CHINESE = re.compile(f"[{_PROTECTED}{_CHINESE_MARKS}]")
_IDEOGRAPH = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_IDEOGRAPH_RE = re.compile(f"[{_IDEOGRAPH}]")
_CJK_PUNCT = frozenset("，。！？：；、…《》「」『』【】〈〉〔〕")
_HALF_PUNCT = re.compile("[,!?:;]")


def _nfkc(text: str, keep: re.Pattern) -> str:
    """NFKC of ``text`` with the characters ``keep`` matches left as they are."""
    if not keep.search(text):
        return unicodedata.normalize("NFKC", text)
    out, start = [], 0
    for m in keep.finditer(text):
        out.append(unicodedata.normalize("NFKC", text[start:m.start()]))
        out.append(m.group())
        start = m.end()
    out.append(unicodedata.normalize("NFKC", text[start:]))
    return "".join(out)


def _is_cjk_context(ch: str) -> bool:
    return ch in _CJK_PUNCT or _IDEOGRAPH_RE.match(ch) is not None


def normalize_text(text: str) -> str:
    """NFKC with the Chinese punctuation rule of the module docstring."""
    chinese = _IDEOGRAPH_RE.search(text) is not None
    text = _nfkc(text, _KEEP_CHINESE if chinese else _KEEP_PLAIN)
    if not chinese or not _HALF_PUNCT.search(text):
        return text
    out: list[str] = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch in _FULL_WIDTH and ((out and _is_cjk_context(out[-1])) or (i < last and _is_cjk_context(text[i + 1]))):
            ch = _FULL_WIDTH[ch]
        out.append(ch)
    return "".join(out)


# ------------------------------------------------------------------------------------------------ whitespace
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_INNER_RUN = re.compile(r"(?<=[^\s])[ \t]+(?=[^\s])")  # between two non-space characters: not indentation
_NEWLINES = re.compile(r"\n{3,}")


def clean_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", text)
    # trailing spaces/tabs per line: the regex r"[ \t]+$" (MULTILINE) took quadratic time on a long run of spaces
    # inside a line (40,000 spaces: 4 s; found by fuzzing, tests/test_fuzz_inputs.py)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = _INNER_RUN.sub(" ", text)
    text = _NEWLINES.sub("\n\n", text)
    return text.strip()


# ------------------------------------------------------------------------------------------------ PII
def mask_pii(text: str, counts: dict[str, int]) -> str:
    """``text`` with e-mails, resident IDs and mobile numbers masked; ``counts[kind]`` grows per item masked."""
    def sub(pattern: re.Pattern, kind: str, placeholder: str, check: Callable[[str], bool] | None = None):
        def replace(m: re.Match) -> str:
            if check is not None and not check(m.group()):
                return m.group()
            counts[kind] += 1
            return placeholder
        return pattern.sub(replace, text)

    if "@" in text:
        text = sub(EMAIL, "email", "<EMAIL>")
    text = sub(RESIDENT_ID, "id", "<ID>", valid_resident_id)
    return sub(PHONE, "phone", "<PHONE>")


# ------------------------------------------------------------------------------------------------ language
_LETTER = re.compile(r"[^\W\d_]")  # letters, ideographs included (str.isalpha, roughly)
_ASCII_LETTER = re.compile("[A-Za-z]")
_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")


def _count(pattern: re.Pattern, text: str, chunk: int = 65536) -> int:
    """How many characters of ``text`` the one-character ``pattern`` matches, a chunk at a time (re.sub keeps a
    list entry per match). ``len(findall)`` made a list of one string per character, ~80 bytes each: 17 MB for a
    200,000-character reply (found by fuzzing, tests/test_fuzz_inputs.py)."""
    return sum(len(part) - len(pattern.sub("", part)) for part in (text[i:i + chunk]
                                                                   for i in range(0, len(text), chunk)))


def detect_language(text: str) -> str | None:
    """"zh" when CJK ideographs are >= 30% of the letters (ideographs counted as letters) and kana < 10% (so
    Japanese is not taken for Chinese), "en" when ASCII letters are >= 70%, "other" otherwise, None with no
    letters at all."""
    letters = _count(_LETTER, text)
    if not letters:
        return None
    if _count(_IDEOGRAPH_RE, text) >= 0.3 * letters and _count(_KANA, text) < 0.1 * letters:
        return "zh"
    if _count(_ASCII_LETTER, text) >= 0.7 * letters:
        return "en"
    return "other"


# ------------------------------------------------------------------------------------------------ helpers
_WS = re.compile(r"\s+")


def _content_key(d: Dialogue) -> str:
    """What duplicates are compared on: system and every message, case-folded, whitespace removed."""
    parts = [d.system or ""] + [text for t in d.turns for text in (t.user, t.assistant)]
    return "\x1e".join(_WS.sub("", p).casefold() for p in parts)


_SHINGLE_BATCH = 4096  # shingles hashed at once: datasketch makes a (batch, NUM_PERM) uint64 array per batch


def _shingle_batches(key: str):
    """The key's shingles in batches of at most _SHINGLE_BATCH (repeats included: a MinHash is a minimum, so a
    repeat changes nothing). Hashed all at once they cost 1 KB per character: a 200,000-character dialogue took
    250 MB (found by fuzzing, tests/test_fuzz_inputs.py)."""
    text = key.replace("\x1e", "")
    if len(text) <= SHINGLE:
        yield [text.encode("utf-8")]
        return
    count = len(text) - SHINGLE + 1
    for start in range(0, count, _SHINGLE_BATCH):
        yield [text[i:i + SHINGLE].encode("utf-8") for i in range(start, min(start + _SHINGLE_BATCH, count))]


def _example(turn: Turn | None) -> str:
    text = "(no turns)" if turn is None else f"Q: {turn.user} | A: {turn.assistant}"
    text = _WS.sub(" ", text)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 1] + "…"


def _map_text(d: Dialogue, fn: Callable[[str], str]) -> Dialogue:
    return Dialogue(tuple(Turn(fn(t.user), fn(t.assistant)) for t in d.turns),
                    None if d.system is None else fn(d.system), d.id)


class _Length:
    """Text lengths in tokenizer tokens (characters without a tokenizer), each text measured once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        n = self.cache.get(text)
        if n is None:
            n = self.cache[text] = len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return n


class _NearDuplicates:
    def __init__(self, threshold: float):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise MissingDependencyError("near-duplicate removal needs datasketch: pip install datasketch") from None
        import numpy as np

        self.np = np
        self.empty = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)  # copied: the permutations are made once
        self.threshold = threshold
        # the index only proposes candidates; a lower LSH threshold than the rule's misses fewer near duplicates
        # (LSH recall right at its own threshold is poor, and datasketch cannot build one above ~0.98); every
        # candidate is then confirmed with the MinHash Jaccard estimate against the rule's threshold
        self.lsh = MinHashLSH(threshold=min(max(threshold - 0.1, 0.05), 0.95), num_perm=NUM_PERM)
        self.kept: list = []  # hash values of the kept dialogues, by LSH key

    def seen(self, key: str) -> bool:
        """Whether ``key`` is a near duplicate of a kept one; if not, it is kept (remembered)."""
        mh = self.empty.copy()
        for batch in _shingle_batches(key):
            mh.update_batch(batch)
        values = mh.hashvalues
        for candidate in self.lsh.query(mh):
            if self.np.count_nonzero(self.kept[candidate] == values) / NUM_PERM >= self.threshold:
                return True
        self.lsh.insert(len(self.kept), mh, check_duplication=False)
        self.kept.append(values.copy())
        return False


# ------------------------------------------------------------------------------------------------ cleaning
def clean_dialogues(dialogues: list[Dialogue], config: CleanConfig = CleanConfig(), *,
                    tokenizer=None) -> tuple[list[Dialogue], dict]:
    """The cleaned dialogues (input order) and the report (module docstring). Rules run in the order of
    RULES: text first (normalise, whitespace, PII), then what is dropped (turns, then dialogues)."""
    c = _Cleaning(dialogues)
    length = _Length(tokenizer)
    c.modify("normalize", normalize_text)
    c.modify("whitespace", clean_whitespace)
    masked = {"email": 0, "id": 0, "phone": 0}
    c.rules["pii_masked"]["enabled"] = config.mask_pii
    if config.mask_pii:
        c.modify("pii_masked", lambda text: mask_pii(text, masked))
    c.rules["pii_masked"]["masked"] = masked

    c.drop_turns("one_sided_turns", lambda t: not t.user or not t.assistant)
    c.drop_turns("too_short", lambda t: min(length(t.user), length(t.assistant)) < config.min_tokens)
    c.drop_dialogues("empty_dialogues", lambda d: not d.turns)
    c.drop_dialogues("too_long", lambda d: (length(d.system) if d.system else 0)
                     + sum(length(t.user) + length(t.assistant) for t in d.turns) > config.max_tokens)
    _language_rule(c, config)
    _duplicate_rules(c, config)
    report = {
        "input": len(dialogues), "output": len(c.work),
        "turns_in": c.turns_in, "turns_out": sum(len(d.turns) for d in c.work),
        "length_unit": "characters" if tokenizer is None else "tokens",
        "config": {**dataclasses.asdict(config), "languages": list(config.languages)},
        "rules": c.rules, "examples": c.examples,
    }
    return c.work, report


class _Cleaning:
    """The dialogues as the rules leave them, and what each rule did (counts and a few examples)."""

    def __init__(self, dialogues: list[Dialogue]):
        self.work = list(dialogues)
        self.turns_in = sum(len(d.turns) for d in self.work)
        self.rules = {name: {"dropped_dialogues": 0, "dropped_turns": 0, "modified": 0} for name in RULES}
        self.examples: dict[str, list[str]] = {name: [] for name in DROP_RULES}

    def modify(self, name: str, fn: Callable[[str], str]) -> None:
        out = []
        for d in self.work:
            new = _map_text(d, fn)
            if new != d:
                self.rules[name]["modified"] += 1
            out.append(new)
        self.work = out

    def note(self, name: str, turn: Turn | None) -> None:
        if len(self.examples[name]) < EXAMPLES:
            self.examples[name].append(_example(turn))

    def drop_turns(self, name: str, bad: Callable[[Turn], bool]) -> None:
        out = []
        for d in self.work:
            kept = []
            for t in d.turns:
                if bad(t):
                    self.rules[name]["dropped_turns"] += 1
                    self.note(name, t)
                else:
                    kept.append(t)
            out.append(d if len(kept) == len(d.turns) else dataclasses.replace(d, turns=tuple(kept)))
        self.work = out

    def drop_dialogues(self, name: str, bad: Callable[[Dialogue], bool]) -> None:
        out = []
        for d in self.work:  # in order: ``bad`` may remember what was kept (duplicates)
            if bad(d):
                self.rules[name]["dropped_dialogues"] += 1
                self.rules[name]["dropped_turns"] += len(d.turns)
                self.note(name, d.turns[0] if d.turns else None)
            else:
                out.append(d)
        self.work = out


def _language_rule(c: _Cleaning, config: CleanConfig) -> None:
    """Keep dialogues in the configured languages, judged on the replies (else on all the text)."""
    detected = {"zh": 0, "en": 0, "other": 0, "none": 0}
    c.rules["language"]["enabled"] = bool(config.languages)

    def wrong_language(d: Dialogue) -> bool:
        lang = detect_language("\n".join(t.assistant for t in d.turns))
        if lang is None:
            lang = detect_language("\n".join([d.system or ""] + [x for t in d.turns for x in (t.user, t.assistant)]))
        detected[lang or "none"] += 1
        return lang is not None and lang not in config.languages

    if config.languages:
        c.drop_dialogues("language", wrong_language)
    c.rules["language"]["detected"] = detected


def _duplicate_rules(c: _Cleaning, config: CleanConfig) -> None:
    """Exact duplicates (same content key), then near duplicates (MinHash over the kept ones)."""
    seen_exact: set[bytes] = set()

    def exact_duplicate(d: Dialogue) -> bool:
        digest = hashlib.sha1(_content_key(d).encode("utf-8")).digest()
        if digest in seen_exact:
            return True
        seen_exact.add(digest)
        return False

    c.drop_dialogues("exact_duplicates", exact_duplicate)
    if c.work:
        near = _NearDuplicates(config.near_duplicate_threshold)
        c.drop_dialogues("near_duplicates", lambda d: near.seen(_content_key(d)))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def clean_file(in_path: str, out_path: str, config: CleanConfig = CleanConfig(), *, tokenizer=None) -> dict:
    """Clean ``in_path`` into ``out_path`` (BELLE multi-turn JSON lines) and write the report to
    ``<out_path>.report.json``; returns the report. The input file is only read."""
    report_path = out_path + ".report.json"
    if _same_file(in_path, out_path) or _same_file(in_path, report_path):
        raise InputError(f"{out_path}: --out must differ from the input; cleaning never rewrites its input")
    cleaned, report = clean_dialogues(read_dialogues(in_path), config, tokenizer=tokenizer)
    write_dialogues(cleaned, out_path)
    report = {"input_file": in_path, "output_file": out_path, **report}
    write_text_atomic(report_path, [json.dumps(report, ensure_ascii=False, indent=2) + "\n"])
    return report

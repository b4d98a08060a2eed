"""Reply quality against reference replies: corpus BLEU-4 (sacrebleu) and sentence ROUGE-L (our LCS).

* BLEU-4 is sacrebleu's corpus BLEU with its Chinese tokenisation (``tokenize="zh"``) and every other
  setting at sacrebleu's default (one reference per hypothesis, exponential smoothing); its signature is
  reported with the score so the number can be reproduced.
* ROUGE-L is the plain F1 (beta = 1) of the longest common subsequence: P = LCS/len(hyp),
  R = LCS/len(ref), F1 = 2PR/(P+R), 0 when the LCS is empty. It is computed per pair and macro-averaged
  over pairs, x100. Units are characters with whitespace removed (``level="char"``) or jieba words, in
  jieba's default (accurate, HMM) mode, with whitespace tokens dropped (``level="word"``).

sacrebleu and jieba are imported only when a metric needs them; jieba's dictionary loads on its first use
and its log chatter is turned down to warnings.
"""
from __future__ import annotations

import functools
import logging

from ..errors import InputError, MissingDependencyError

_INSTALL = "pip install 'belle_edge[train]'"
LEVELS = {"char": "char", "word": "word (jieba)"}


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references):
        raise InputError(f"reply metrics need one reference per hypothesis: got {len(hypotheses)} hypotheses "
                         f"but {len(references)} references")


@functools.cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise MissingDependencyError(f"word-level ROUGE-L needs jieba: {_INSTALL}") from None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." on every run
    return jieba


def _units(text: str, level: str) -> list[str]:
    if level == "char":
        return [c for c in text if not c.isspace()]
    if level == "word":
        return [w for w in _jieba().lcut(text) if w.strip()]
    raise ValueError(f"ROUGE-L level must be 'char' or 'word', not {level!r}")


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences: the O(len(a)*len(b)) DP, one row kept."""
    if len(a) < len(b):
        a, b = b, a  # the row runs over the shorter sequence
    prev = [0] * (len(b) + 1)  # prev[j]: LCS of a[:i-1] and b[:j]
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            # a match extends the diagonal; otherwise the better of dropping x or dropping y
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def _rouge_l_f1(hyp: list, ref: list) -> float:
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0  # also covers an empty hypothesis or reference
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def bleu4(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU-4 (0-100) with sacrebleu, Chinese tokenisation, one reference per hypothesis."""
    _check_pairs(hypotheses, references)
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise MissingDependencyError(f"BLEU needs sacrebleu: {_INSTALL}") from None
    metric = BLEU(tokenize="zh")
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu4": round(score.score, 2), "signature": str(metric.get_signature()), "scored": len(hypotheses)}


def rouge_l(hypotheses: list[str], references: list[str], *, level: str) -> dict:
    """ROUGE-L F1 (LCS, beta = 1) per pair, macro-averaged, x100; ``level`` is "char" or "word" (jieba)."""
    if level not in LEVELS:
        raise ValueError(f"ROUGE-L level must be 'char' or 'word', not {level!r}")
    _check_pairs(hypotheses, references)
    scores = [_rouge_l_f1(_units(h, level), _units(r, level)) for h, r in zip(hypotheses, references)]
    value = 100 * sum(scores) / len(scores) if scores else 0.0
    return {"rouge_l": round(value, 2), "level": LEVELS[level], "scored": len(scores)}


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict:
    """BLEU-4 and character- and word-level ROUGE-L over the pairs whose reference is not blank."""
    _check_pairs(hypotheses, references)
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r.strip()]
    if not pairs:
        raise InputError(f"all {len(references)} references are empty: nothing to score replies against")
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    bleu = bleu4(hyps, refs)
    return {"bleu4": bleu["bleu4"], "bleu_signature": bleu["signature"],
            "rouge_l_char": rouge_l(hyps, refs, level="char")["rouge_l"],
            "rouge_l_word": rouge_l(hyps, refs, level="word")["rouge_l"],
            "scored": len(pairs), "empty_references_excluded": len(references) - len(pairs)}


def format_metrics(m: dict) -> str:
    """The figures of ``generation_metrics`` as labelled lines."""
    lines = [f"BLEU-4 (sacrebleu, zh tokenisation): {m['bleu4']:.2f}  [{m['bleu_signature']}]",
             f"ROUGE-L F1, character level: {m['rouge_l_char']:.2f}",
             f"ROUGE-L F1, word level (jieba): {m['rouge_l_word']:.2f}",
             f"pairs scored: {m['scored']}"]
    if m.get("empty_references_excluded"):
        lines[-1] += f" ({m['empty_references_excluded']} with an empty reference left out)"
    return "\n".join(lines)

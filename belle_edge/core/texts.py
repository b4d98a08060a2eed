"""Text every machine has, split once into calibration and held-out halves so that no measure is taken on
the text that chose what to prune.

English: CPython's ``pydoc_data.topics`` (real prose, in every Python install), topics in sorted order,
even ones for calibration, odd ones held out. Chinese: fixtures written for this project
(``belle_edge/data/zh_*.txt``) and, once fetched (``belle-edge fetch-corpus peoples-daily``, which `make`
runs), news nobody here wrote: the People's Daily of January 1998 (belle_edge/corpora.py), its first half
for calibration, its second held out. A slice of each half is enough for every measure taken here.
"""
from __future__ import annotations

import functools
from importlib import resources


def _topics(parity: int) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for k in keys[parity::2])


def english_calibration() -> str:
    return _topics(0)


def english_held_out() -> str:
    return _topics(1)


def _data(name: str) -> str:
    return resources.files("belle_edge").joinpath("data", name).read_text(encoding="utf-8")


def chinese_calibration() -> str:
    return _data("zh_calibration.txt")


def chinese_held_out() -> str:
    return _data("zh_held_out.txt")


NEWS_CHARS = 20_000  # of each People's Daily half: ~15k tokens, more than any measure here takes


@functools.cache
def _news() -> tuple[str, str] | None:
    """The corpus's two slices, read once per process (held-out, calibration and the records' description
    all ask; the file is 5 MB). A corpus fetched later in the same process is seen from the next one."""
    from ..corpora import corpus_halves

    halves = corpus_halves("peoples-daily")
    return None if halves is None else (halves[0][:NEWS_CHARS], halves[1][:NEWS_CHARS])


def held_out_texts() -> dict[str, str]:
    """The default evaluation texts, by name."""
    texts = {"en:pydoc_data.topics(odd)": english_held_out(), "zh:zh_held_out.txt": chinese_held_out()}
    news = _news()
    if news is not None:
        texts["zh:peoples-daily-199801(second half)"] = news[1]
    return texts


def calibration_texts() -> list[str]:
    """The default calibration texts: English (even topics), Chinese (``zh_calibration.txt``) and, when
    fetched, the first half of the People's Daily corpus."""
    news = _news()
    return [english_calibration(), chinese_calibration(), *([news[0]] if news is not None else [])]


def calibration_description() -> str:
    """How records name the default calibration texts."""
    news = " + peoples-daily-199801 (first half)" if _news() is not None else ""
    return f"default (pydoc_data.topics even topics + zh_calibration.txt{news})"

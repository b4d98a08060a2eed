"""Text every machine has, split once into calibration and held-out halves so that no measure is taken on
the text that chose what to prune.

English: CPython's ``pydoc_data.topics`` (real prose, in every Python install), topics in sorted order,
even ones for calibration, odd ones held out. Chinese: fixtures written for this project
(``belle_edge/data/zh_*.txt``).
"""
from __future__ import annotations

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


def held_out_texts() -> dict[str, str]:
    """The default evaluation texts, by name."""
    return {"en:pydoc_data.topics(odd)": english_held_out(), "zh:zh_held_out.txt": chinese_held_out()}


def calibration_texts() -> list[str]:
    """The default calibration texts: English (even topics) and Chinese (``zh_calibration.txt``)."""
    return [english_calibration(), chinese_calibration()]

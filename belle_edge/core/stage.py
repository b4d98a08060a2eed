"""What a compiler stage is: a name, what it reads, what it writes, and ``run`` -> its manifest record.

Stages meet on disk: each reads what an earlier stage (or the user) left in a folder — a checkpoint, a
quantized checkpoint, an artifact — and leaves its own output in one, so any stage can also run alone from
the folder the previous one wrote (``belle-edge prune``, ``quantize``, ``export``, ``build-engine``).
:func:`measured` gives every stage the same record: seconds and peak resident memory, next to the
stage's own figures.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Protocol

from ..manifest import StageRecord


class Stage(Protocol):
    name: str  # as in the manifest: "load", "prune", "quantize", "export", "fidelity", "build", "package"
    reads: str  # what it takes, in words ("checkpoint: Hugging Face directory or GGUF")
    writes: str  # what it leaves ("model.onnx + model.onnx.data in the artifact")

    def run(self, job) -> StageRecord:
        """Do the stage's work on ``job`` (the compile in progress, compile/job.py) and record it."""
        ...


def measured(stage: Stage, work: Callable[[], dict], *, reads: str = "", writes: tuple[str, ...] = ()) -> StageRecord:
    """Run ``work`` (-> the stage's details) and wrap what it returns in the stage's record."""
    t0 = time.perf_counter()
    with RssSampler() as rss:
        details = work()
    return StageRecord(name=stage.name, seconds=round(time.perf_counter() - t0, 2),
                       peak_rss_mb=round(rss.peak / 2**20, 1), reads=reads, writes=tuple(writes), details=details)


def run_stages(job, stages: list[Stage], *, progress: bool) -> None:
    """Run ``stages`` in order on ``job``, appending each record to ``job.records``."""
    bar = _progress(len(stages)) if progress else None  # build-engine runs on a Jetson without tqdm
    for stage in stages:
        if bar is not None:
            bar.set_description(f"compile: {stage.name}")
        job.records.append(stage.run(job))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="stage", leave=False)


class RssSampler:
    """Peak resident memory of this process while a stage runs (sampled every 20 ms from /proc)."""

    def __init__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

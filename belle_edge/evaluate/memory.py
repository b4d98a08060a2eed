"""``belle-edge eval --memory``: what the turn window forgets, and what pinned notes keep.

The probe set (``belle_edge/data/memory_probes.jsonl``, made by benchmarks/make_memory_probes.py) holds
customer-service dialogues in which the customer states a fact (order number, phone, address, name, product,
size, date) at one turn and asks for it back ``d`` turns later (d = 1..10), with ordinary turns between. Each
dialogue runs once per setting through the runtime's own chat session: every turn with its reference reply
(``ChatSession.add_turn``, as ``belle-edge eval`` feeds earlier turns); at each of the ten turns after the fact
the session is saved, asked, scored and restored, so the ten probes of a dialogue share its prefill. A probe
is right when the greedy reply contains the fact, both normalised (full/half width, case, spaces, dashes).

Settings: ``off`` (the window off: the original model, nothing forgotten), ``W3`` (the turn window), and
``W3+rules`` / ``W3+app``, the window with pinned notes: ``rules`` are the session's automatic notes (order
numbers, phones, addresses, e-mails found in the customer's messages), ``app`` is an app that pins the fact
itself when it is stated (its own slot filling) — the upper bound of what notes can do here.

Reported per setting: accuracy by distance, over d > 3 (past a window of 3) and in all, the KV tokens held
when the question arrives, and the time to the first token of the reply to it.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import unicodedata
from dataclasses import dataclass
from importlib import resources

from ..errors import InputError

DEFAULT_SETTINGS = ("off", "W1", "W3", "W5", "W8", "W1+rules", "W3+rules", "W5+rules", "W8+rules",
                    "W1+app", "W3+app", "W5+app", "W8+app")
NOTE_MODES = ("rules", "app")
# the key an app pins a fact under (what the model reads in the notes block)
APP_KEYS = {"zh": {"order": "订单号", "phone": "电话", "address": "地址", "name": "姓名", "product": "商品",
                   "size": "尺码", "date": "送货日期"},
            "en": {"order": "order number", "phone": "phone", "address": "address", "name": "name",
                   "product": "product", "size": "size", "date": "delivery date"}}
FAR = 3  # "far" probes: d > FAR, past a window of 3 turns


@dataclass(frozen=True)
class Setting:
    window: int | None  # None: the window off
    notes: str | None = None  # None | "rules" | "app"

    @property
    def name(self) -> str:
        base = "off" if self.window is None else f"W{self.window}"
        return base + (f"+{self.notes}" if self.notes else "")


def parse_setting(text: str) -> Setting:
    m = re.fullmatch(r"(off|W(\d+))(?:\+(\w+))?", text.strip())
    if not m or (m.group(3) and m.group(3) not in NOTE_MODES):
        raise InputError(f"memory setting {text!r}: expected off, W<turns> or W<turns>+{'|'.join(NOTE_MODES)} "
                         "(e.g. W3+rules)")
    return Setting(None if m.group(1) == "off" else int(m.group(2)), m.group(3))


def read_probes(path: str | None = None) -> list[dict]:
    """The probe dialogues (the project's set by default); InputError naming the line and field otherwise."""
    where = path or "belle_edge/data/memory_probes.jsonl"
    try:
        if path is None:
            text = resources.files("belle_edge").joinpath("data", "memory_probes.jsonl").read_text(encoding="utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read the probe set ({e})") from None
    dialogues = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            dialogues.append(_checked(line, f"{where}:{n}"))
    if not dialogues:
        raise InputError(f"{where}: no probe dialogues")
    return dialogues


def _checked(line: str, where: str) -> dict:
    try:
        d = json.loads(line)
    except ValueError as e:
        raise InputError(f"{where}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected an object, got {type(d).__name__}")
    for field, kind in (("id", str), ("lang", str), ("kind", str), ("fact", str), ("fact_turn", int),
                        ("turns", list), ("asks", list)):
        if not isinstance(d.get(field), kind) or isinstance(d.get(field), bool):
            raise InputError(f"{where}: field {field!r}: expected {kind.__name__}, got {d.get(field)!r:.40}")
    turns, asks, k = d["turns"], d["asks"], d["fact_turn"]
    if not all(isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("reply"), str)
               for t in turns):
        raise InputError(f"{where}: field 'turns': expected {{user, reply}} strings")
    if not (1 <= k <= len(turns) and asks and all(isinstance(a, str) and a.strip() for a in asks)
            and k + len(asks) <= len(turns) and d["fact"].strip()):
        raise InputError(f"{where}: fact_turn {k} + {len(asks)} asks must fit in the {len(turns)} turns")
    if d.get("system") is not None and not isinstance(d["system"], str):
        raise InputError(f"{where}: field 'system': expected a string or null")
    return d


def normalise(text: str) -> str:
    """Full-width to half-width (NFKC), lower case, without spaces and dashes: "１３８-1234 5678" finds
    "13812345678"."""
    return re.sub(r"[\s\-‐‑–—_]", "", unicodedata.normalize("NFKC", text).lower())


def contains_fact(reply: str, fact: str) -> bool:
    return normalise(fact) in normalise(reply)


def run_memory(model, settings: list[Setting], dialogues: list[dict], *, sinks: int = 4, max_new_tokens: int = 32,
               progress: bool = True) -> dict:
    """Every probe of ``dialogues`` under every setting; the rows and the summary per setting."""
    from tqdm import tqdm

    rows = []
    with tempfile.TemporaryDirectory(prefix="belle_edge-memory-") as tmp:
        jobs = [(s, d) for s in settings for d in dialogues]
        for setting, dialogue in tqdm(jobs, disable=not progress, desc="memory", unit="dialogue", leave=False):
            rows += _run_dialogue(model, setting, dialogue, sinks=sinks, max_new_tokens=max_new_tokens,
                                  snapshot=os.path.join(tmp, "snapshot.npz"))
    return {"model": model.name, "backend": model.backend_name, "sinks": sinks, "max_new_tokens": max_new_tokens,
            "probes": sum(len(d["asks"]) for d in dialogues), "dialogues": len(dialogues),
            "summary": summarise(rows, [s.name for s in settings]), "rows": rows}


def _run_dialogue(model, setting: Setting, dialogue: dict, *, sinks: int, max_new_tokens: int,
                  snapshot: str) -> list[dict]:
    session = model.session(system=dialogue.get("system"), window=setting.window, sinks=sinks,
                            max_new_tokens=max_new_tokens, max_kv_tokens=min(model.max_positions, 2048),
                            auto_notes=setting.notes == "rules")
    fact, k = dialogue["fact"], dialogue["fact_turn"]
    rows = []
    for t, turn in enumerate(dialogue["turns"], 1):
        if t > k:  # a probe: ask instead of this turn, then go back and take the turn as written
            d = t - k
            session.save(snapshot)
            reply, stats = _ask(session, dialogue["asks"][d - 1], fact)
            rows.append({"setting": setting.name, "id": dialogue["id"], "lang": dialogue["lang"],
                         "kind": dialogue["kind"], "distance": d, "right": contains_fact(reply, fact),
                         "kv_tokens": stats.kv_tokens - stats.new_tokens, "note_tokens": session.note_tokens,
                         "ttft_ms": round(stats.ttft_ms, 1), "reply": reply})
            if d == len(dialogue["asks"]):
                break
            session = model.restore(snapshot)
        if t == k and setting.notes == "app":
            session.pin(APP_KEYS.get(dialogue["lang"], APP_KEYS["en"]).get(dialogue["kind"], dialogue["kind"]), fact)
        session.add_turn(turn["user"], turn["reply"])
    return rows


def _ask(session, message: str, fact: str):
    """The reply to ``message``, cut short once it holds the fact (greedy: the rest cannot change the score)."""
    stream = session.stream(message)
    text = ""
    for piece in stream:
        text += piece
        if contains_fact(text, fact):
            break
    stream.close()
    return text, session.last_stats


def summarise(rows: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        by_d = {}
        for r in mine:
            by_d.setdefault(r["distance"], []).append(r["right"])
        far = [r["right"] for r in mine if r["distance"] > FAR]
        out[name] = {"accuracy": _share([r["right"] for r in mine]), "accuracy_far": _share(far),
                     "accuracy_by_distance": {d: _share(v) for d, v in sorted(by_d.items())},
                     "accuracy_far_by_kind": {kind: _share([r["right"] for r in mine
                                                            if r["kind"] == kind and r["distance"] > FAR])
                                              for kind in sorted({r["kind"] for r in mine})},
                     "kv_tokens_mean": round(statistics.mean(r["kv_tokens"] for r in mine), 1),
                     "note_tokens_mean": round(statistics.mean(r["note_tokens"] for r in mine), 1),
                     "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in mine), 1),
                     "probes": len(mine)}
    return out


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def goal(summary: dict, window: int = 3) -> list[dict]:
    """Issue 17's goal per notes mode: with W=3 and notes, far accuracy >= 90% of the mask-off's, and KV held
    within 10% of W=3 without notes."""
    base, off = summary.get(f"W{window}"), summary.get("off")
    out = []
    for mode in NOTE_MODES:
        pinned = summary.get(f"W{window}+{mode}")
        if not (pinned and base and off) or not off["accuracy_far"]:
            continue
        ratio = pinned["accuracy_far"] / off["accuracy_far"]
        kv = pinned["kv_tokens_mean"] / base["kv_tokens_mean"]
        out.append({"setting": f"W{window}+{mode}", "far_accuracy_vs_off": round(ratio, 3),
                    "kv_vs_window": round(kv, 3), "met": ratio >= 0.9 and kv <= 1.1})
    return out


def format_table(result: dict) -> str:
    summary = result["summary"]
    by_d = {name: {int(d): v for d, v in s["accuracy_by_distance"].items()} for name, s in summary.items()}
    distances = sorted({d for v in by_d.values() for d in v})
    head = ("| setting | all | d > 3 | " + " | ".join(f"d={d}" for d in distances)
            + " | KV held at the question | of which notes | TTFT of the question (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary.items():
        cells = [f"{_pct(s['accuracy'])}", f"{_pct(s['accuracy_far'])}"]
        cells += [_pct(by_d[name].get(d)) for d in distances]
        cells += [f"{s['kv_tokens_mean']:.0f} tok", f"{s['note_tokens_mean']:.0f} tok", f"{s['ttft_ms_median']:.0f} ms"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def plot(result: dict, path: str) -> None:
    """Accuracy against distance, one line per setting (matplotlib, the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a colour per window, a line style per kind of notes: thirteen settings stay apart
    windows = sorted({name.split("+")[0] for name in result["summary"]}, key=lambda w: (w != "off", len(w), w))
    colour = {w: plt.get_cmap("tab10")(i % 10) for i, w in enumerate(windows)}
    styles = {None: "-", "rules": "--", "app": "-."}
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name, s in result["summary"].items():
        by_d = {int(d): v for d, v in s["accuracy_by_distance"].items()}  # keys are strings after a JSON trip
        xs = sorted(by_d)
        window, _, notes = name.partition("+")
        ax.plot(xs, [100 * by_d[x] for x in xs], styles.get(notes or None, ":"), color=colour[window],
                linewidth=2.2 if name == "off" else 1.4, marker="o", markersize=3, label=name)
    ax.set_xticks(range(1, 11))
    ax.set_xlabel("distance d (turns between the fact and the question)")
    ax.set_ylabel("replies holding the fact (%)")
    ax.set_title(f"What the turn window forgets: {result['probes']} probes\n{result['model']} ({result['backend']})",
                 fontsize=10)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""``chat`` (interactive or a scripted dialogue) and ``demo`` (a scripted Chinese/English dialogue)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from ..errors import BelleEdgeError, InputError
from .common import add_model_args, add_session_args, info, load_model

DEMO_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "demo_dialogue.txt")
DEMO_SYSTEM = "你是“清风茶庄”网店的客服助手，回答简洁、礼貌。用户用哪种语言提问，就用哪种语言回答。"
CANDIDATES = ("int8", "int4")  # compile/for_this_cpu.py (not imported here: it pulls in the compiler)


def register(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal, or run a scripted dialogue")
    add_model_args(chat)
    add_session_args(chat)
    chat.add_argument("--script", help="file with one user message per line ('#' lines and blank lines skipped)")
    chat.add_argument("--json", action="store_true", help="with --script: print one JSON document")
    chat.add_argument("--restore", help="continue a session saved with /save")
    chat.set_defaults(handler=run_chat)

    demo = sub.add_parser("demo", help="the product path: the default model compiled for this CPU (once, at the "
                                       "precision that decodes fastest here), a scripted Chinese/English "
                                       "customer-service dialogue on ONNX Runtime, per-turn stats")
    add_model_args(demo)
    add_session_args(demo)
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--precision", choices=CANDIDATES,
                      help="compile the default model at this precision instead of measuring which is fastest")
    demo.add_argument("--script", default=DEMO_SCRIPT, help="the dialogue (default: belle_edge/data/demo_dialogue.txt)")
    # short replies keep the demo brisk; a small repetition penalty stops a 0.5B model's rare loops
    demo.set_defaults(max_new_tokens=96, repetition_penalty=1.05, handler=run_demo, restore=None, system=DEMO_SYSTEM)


def _open_session(args):
    from ..runtime.sampler import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    script = _read_script(args.script) if args.script else None  # a bad script fails before the slow load
    model = load_model(args)
    if args.restore:
        return model, model.restore(args.restore), script
    session = model.session(system=args.system, window=None if args.no_window else args.window, sinks=args.sinks,
                            sampling=sampling, max_new_tokens=args.max_new_tokens, max_kv_tokens=args.max_kv_tokens,
                            auto_notes=args.auto_notes)
    return model, session, script


def run_demo(args) -> int:
    """With no model named: the default model's artifact for this CPU (compiled and measured on first use)."""
    if args.model is None:
        from ..compile.for_this_cpu import artifact_for_this_cpu
        from ..default_model import DEFAULT

        _read_script(args.script)  # a bad script fails before a long compile
        args.model = artifact_for_this_cpu(DEFAULT, precision=args.precision, log=info)
    elif args.precision is not None:
        raise InputError("--precision applies to the default model's artifact; compile a named model with "
                         "belle-edge compile --precision")
    return run_chat(args)


def run_chat(args) -> int:
    if args.json and not args.script:
        raise InputError("--json needs --script (an interactive chat prints text)")
    model, session, script = _open_session(args)
    if script is not None:
        return _run_script(model, session, script, as_json=args.json)
    return _interactive(session)


def _read_script(path: str) -> list[str]:
    try:
        # a BOM (Windows Notepad; any line of files joined with cat) made its line a message even when it was a '#'
        # comment, and "\ufeff" is no whitespace to strip() (fuzzing): BOMs are dropped
        with open(path, encoding="utf-8") as f:
            lines = [line.replace("\ufeff", "").strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the dialogue script ({e})") from None
    messages = [line for line in lines if line and not line.startswith("#")]
    if not messages:
        raise InputError(f"{path}: the dialogue script has no messages")
    return messages


def _stats_line(s) -> str:
    return (f"[turn {s.turn} | ttft {s.ttft_ms:.0f} ms | prefill {s.prompt_tokens} tok | decode {s.new_tokens} tok "
            f"at {s.decode_tok_s:.1f} tok/s | kv {s.kv_tokens} tok | evicted {s.evicted_tokens}"
            f"{' | context shift' if s.context_shift else ''} | {s.finish_reason}]")


def _run_script(model, session, messages: list[str], *, as_json: bool) -> int:
    turns = []
    for message in messages:
        if not as_json:
            print(f"you> {message}")
            print("bot> ", end="", flush=True)
        pieces = []
        for piece in session.stream(message):
            pieces.append(piece)
            if not as_json:
                print(piece, end="", flush=True)
        stats = session.last_stats
        turns.append({"user": message, "reply": "".join(pieces), **dataclasses.asdict(stats)})
        if not as_json:
            print(f"\n    {_stats_line(stats)}")
    if as_json:
        doc = {"model": model.name, "backend": model.backend_name, "window": session.mask.window,
               "sinks": session.mask.sinks, "turns": turns}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        _print_summary(session)
    return 0


def _print_summary(session) -> None:
    stats = session.stats
    if not stats:
        print("no turns yet")
        return
    ttft = sorted(s.ttft_ms for s in stats)
    rates = sorted(s.decode_tok_s for s in stats if s.decode_tok_s > 0)
    print(f"{len(stats)} turns | median ttft {ttft[len(ttft) // 2]:.0f} ms | median decode "
          f"{rates[len(rates) // 2] if rates else 0:.1f} tok/s | kv held {session.kv_tokens} tok | window "
          f"{session.mask.window if session.mask.enabled else 'off'}")


HELP = ("commands: /reset  /stats  /pin KEY VALUE  /unpin KEY  /save [FILE]  /exit   (Ctrl-C stops a reply, "
        "Ctrl-D or /exit quits)")


def _interactive(session) -> int:
    print(HELP)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line):
                return 0
            continue
        print("bot> ", end="", flush=True)
        try:
            for piece in session.stream(line):
                print(piece, end="", flush=True)
            print(f"\n    {_stats_line(session.last_stats)}")
        except KeyboardInterrupt:
            # Ctrl-C may land in our print, outside the reply's generator: settle the turn now, so /stats,
            # /save and the next message all see it
            session.stop_reply()
            print("\n    [interrupted: the reply so far stays in the dialogue]")
        except BelleEdgeError as e:
            print(f"\nbelle-edge: error: {e}", file=sys.stderr)


def _print_notes(session) -> None:
    notes = "; ".join(f"{k}: {v}" for k, v in session.notes.items())
    placed = f"{session.note_tokens} tok in the cache" if session.note_tokens else "not in the cache yet"
    print(f"    notes: {notes} ({placed}; a change enters with your next message)" if notes else "    notes: none")


def _pin_command(session, name: str, arg: str) -> None:
    key, _, value = arg.partition(" ")
    try:
        if name == "/pin":
            if not value.strip():
                raise InputError("/pin KEY VALUE: both a key and a value, e.g. /pin 订单号 JD20240615123")
            session.pin(key, value.strip())
        else:
            session.unpin(key)
        _print_notes(session)
    except BelleEdgeError as e:
        print(f"belle-edge: error: {e}", file=sys.stderr)


def _command(session, line: str) -> bool:
    """Run a /command; True means quit."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.reset()
        print("    [dialogue reset]")
    elif name == "/stats":
        for s in session.stats:
            print(f"    {_stats_line(s)}")
        _print_summary(session)
        segments = ", ".join(f"{'system + notes' if t == 0 else f'turn {t}'}: {n}"
                             for t, n in session.ledger.turn_counts().items())
        print(f"    kv cache by turn: {segments or 'empty'}")
        _print_notes(session)
    elif name in ("/pin", "/unpin"):
        _pin_command(session, name, arg.strip())
    elif name == "/save":
        path = arg.strip() or "session.npz"
        try:
            session.save(path)
            print(f"    [saved to {path}; continue with: belle-edge chat ... --restore {path}]")
        except OSError as e:
            print(f"belle-edge: error: {path}: cannot save ({e.strerror})", file=sys.stderr)
    else:
        print(f"    unknown command {name}; {HELP}")
    return False

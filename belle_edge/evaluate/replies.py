"""``belle-edge eval``: how well a model answers held-out dialogues.

For every turn of every held-out dialogue the model replies to the user's message through the runtime's
own chat session (runtime/session.py) — the same decode loop, stop tokens and stop strings (BELLE's
``Human:``), whole-character cuts and turn window as ``belle-edge chat`` — with the earlier turns and
their reference replies fed in before it (``ChatSession.add_turn``). Greedy, at most ``max_new_tokens``.
The replies are scored against the references (BLEU-4, ROUGE-L by character and by jieba word,
``generation.py``). Perplexity is teacher-forced on the reference replies' tokens only, reported per
token and per character of those replies (the one that compares across tokenizers). With a teacher,
the fidelity figures of ``fidelity.py`` are added.
"""
from __future__ import annotations

import math

import torch

from ..default_model import DEFAULT
from ..mask import MaskConfig


def model_reply(chat, dialogue, k: int, *, window: int | None, sinks: int, max_new_tokens: int) -> str:
    """The model's reply to turn ``k`` of ``dialogue``, after turns 1..k-1 with their reference replies."""
    session = chat.session(system=dialogue.system, window=window, sinks=sinks, max_new_tokens=max_new_tokens)
    for turn in dialogue.turns[:k - 1]:
        session.add_turn(turn.user, turn.assistant)
    return session.send(dialogue.turns[k - 1].user).text.strip()


def reply_perplexity(model, tokenizer, chat_format, dialogues, mask: MaskConfig) -> dict:
    from ..core.rows import ReplyLoss, encode_dialogue, pack

    loss_fn = ReplyLoss(mask)
    total, count = 0.0, 0
    with torch.no_grad():
        for d in dialogues:
            rows, _ = pack([encode_dialogue(d, tokenizer, chat_format)], 1 << 30)
            for row in rows:
                loss, n = loss_fn(model, row)
                total, count = total + float(loss), count + n
    # Per token, a perplexity depends on the tokenizer (a byte-level one spends ~3 easy tokens on a Chinese
    # character); per character of the same reference replies, models with different tokenizers compare.
    chars = sum(len(t.assistant) for d in dialogues for t in d.turns)
    return {"perplexity": round(math.exp(total / count), 3) if count else None, "reply_tokens": count,
            "reply_chars": chars, "char_perplexity": round(math.exp(total / chars), 3) if chars else None}


def run_eval(model_path: str | None, data_path: str, *, teacher: str | None = None, max_new_tokens: int = 64,
             limit: int | None = None, window: int | None = 3, sinks: int = 4, progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..api import torch_chat_model
    from ..core.dialogues import read_dialogues
    from ..core.load import load_checkpoint
    from ..models.decoder import Decoder
    from .generation import generation_metrics

    ckpt = load_checkpoint(model_path)
    model = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source)
    chat = torch_chat_model(ckpt, decoder=model)
    dialogues = read_dialogues(data_path)[:limit]
    mask = MaskConfig(window=window, sinks=sinks) if window is not None else MaskConfig.off()
    hyps, refs, samples = [], [], []
    pairs = [(d, k) for d in dialogues for k in range(1, len(d.turns) + 1)]
    for d, k in tqdm(pairs, disable=not progress, desc="eval", unit="reply", leave=False):
        reply = model_reply(chat, d, k, window=window, sinks=sinks, max_new_tokens=max_new_tokens)
        hyps.append(reply)
        refs.append(d.turns[k - 1].assistant)
        if len(samples) < 3:
            samples.append({"user": d.turns[k - 1].user, "reference": refs[-1], "reply": reply})
    result = {"model": model_path or DEFAULT, "data": data_path, "dialogues": len(dialogues),
              "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "window": window, "sinks": sinks},
              "replies": generation_metrics(hyps, refs),
              "assistant_perplexity": reply_perplexity(model, ckpt.tokenizer, ckpt.chat_format, dialogues, mask),
              "samples": samples}
    if teacher is not None:
        from .fidelity import eval_fidelity

        result["fidelity"] = eval_fidelity(model_path, teacher)
    return result

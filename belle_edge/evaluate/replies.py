"""``belle-edge eval``: how well a model answers held-out dialogues.

For every turn of every held-out dialogue the model replies (greedy, at most ``max_new_tokens``) to the
user's message, with the earlier turns and their reference replies as context and the runtime's turn
window as the mask; the replies are scored against the references (BLEU-4, ROUGE-L by character and by
jieba word, ``generation.py``). Perplexity is teacher-forced on the reference replies' tokens only. With a
teacher, the fidelity figures of ``fidelity.py`` are added.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..mask import MaskConfig


@torch.no_grad()
def greedy_reply(model, prompt, mask: MaskConfig, stop_ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation of an encoded prompt with a KV cache; stops at a stop id (not included)."""
    ids, turns = prompt.ids, prompt.turns
    n = len(ids)
    caches = model.new_caches(n + max_new_tokens + 1)
    positions = np.arange(n)
    logits = model(torch.from_numpy(ids)[None], positions, turns, mask, caches=caches, start=0,
                   key_positions=positions, key_turns=turns, last_only=True)
    turn = int(turns[-1])
    k_pos, k_turn = list(positions), list(turns)
    out = []
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        p = n + step
        k_pos.append(p)
        k_turn.append(turn)
        logits = model(torch.tensor([[token]]), np.array([p]), np.array([turn]), mask, caches=caches, start=p,
                       key_positions=np.asarray(k_pos), key_turns=np.asarray(k_turn), last_only=True)
    return out


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
    return {"perplexity": round(math.exp(total / count), 3) if count else None, "reply_tokens": count}


def run_eval(model_path: str | None, data_path: str, *, teacher: str | None = None, max_new_tokens: int = 64,
             limit: int | None = None, window: int | None = 3, sinks: int = 4, progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..core.load import load_checkpoint
    from ..models.decoder import Decoder
    from ..core.rows import encode_dialogue
    from ..core.dialogues import read_dialogues
    from .generation import generation_metrics

    ckpt = load_checkpoint(model_path)
    model = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source)
    dialogues = read_dialogues(data_path)[:limit]
    mask = MaskConfig(window=window, sinks=sinks) if window is not None else MaskConfig.off()
    hyps, refs, samples = [], [], []
    pairs = [(d, k) for d in dialogues for k in range(1, len(d.turns) + 1)]
    for d, k in tqdm(pairs, disable=not progress, desc="eval", unit="reply", leave=False):
        prompt = encode_dialogue(d, ckpt.tokenizer, ckpt.chat_format, prompt_for=k)
        reply = ckpt.tokenizer.decode(greedy_reply(model, prompt, mask, ckpt.stop_token_ids, max_new_tokens))
        reply = reply.rstrip("\ufffd").strip()  # a reply cut at max_new_tokens ends at its last whole character
        hyps.append(reply)
        refs.append(d.turns[k - 1].assistant)
        if len(samples) < 3:
            samples.append({"user": d.turns[k - 1].user, "reference": refs[-1], "reply": reply})
    result = {"model": model_path or "default", "data": data_path, "dialogues": len(dialogues),
              "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "window": window, "sinks": sinks},
              "replies": generation_metrics(hyps, refs),
              "assistant_perplexity": reply_perplexity(model, ckpt.tokenizer, ckpt.chat_format, dialogues, mask),
              "samples": samples}
    if teacher is not None:
        from .fidelity import eval_fidelity

        result["fidelity"] = eval_fidelity(model_path, teacher)
    return result

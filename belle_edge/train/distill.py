"""``belle-edge train distill STUDENT --teacher TEACHER``: win back what pruning cost by matching the
teacher's next-token distributions (KL(teacher || student) at temperature tau, scaled by tau^2, optionally
plus the language-model loss), full-parameter (``lora_rank`` 0, the default here) or LoRA.

The student may have a smaller vocabulary (vocabulary pruning): the teacher's logits are taken on the
student's tokens (matched by string, as ``eval-fidelity`` does), so both distributions live on the shared
vocabulary. Data: plain text (default: the calibration text pruning used) cut into rows, or BELLE dialogues
(``.jsonl``), whose rows carry the turn-window mask and whose loss covers the replies only.

The run folder holds ``model/`` (the distilled checkpoint, with ``training.json`` and the student's
``pruning.json``), ``checkpoints/`` and ``training.json``.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..mask import MaskConfig
from ..core.folders import write_text_atomic
from ..core.rows import ReplyLoss, Row, encode_dialogue, pack
from .sft import RECORD, lora, mask_of, trainable_share
from .trainer import TrainConfig, sample_rows, seed_everything, train

DEFAULT_DISTILL_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "distill.json")


class DistillLoss(ReplyLoss):
    def __init__(self, teacher, to_teacher: torch.Tensor, mask: MaskConfig, *, temperature: float, lm_weight: float):
        super().__init__(mask)
        self.teacher, self.to_teacher = teacher, to_teacher
        self.tau, self.lm_weight = temperature, lm_weight

    def __call__(self, model, row: Row):
        targets = torch.from_numpy(row.targets)
        keep = targets != -100
        shared = self.to_teacher.shape[0]
        allowed = torch.from_numpy(row.allowed(self.mask))  # one (T, T) mask for both models
        student = self.logits(model, row, allowed)[:-1][keep][:, :shared].float()
        with torch.no_grad():
            teacher = self.teacher(self.to_teacher[torch.from_numpy(row.ids)][None], row.positions, row.turns,
                                   self.mask, allowed=allowed)[0][:-1][keep][:, self.to_teacher].float()
        log_t = torch.log_softmax(teacher / self.tau, -1)
        log_s = torch.log_softmax(student / self.tau, -1)
        loss = (log_t.exp() * (log_t - log_s)).sum() * self.tau ** 2
        if self.lm_weight:
            loss = loss + self.lm_weight * F.cross_entropy(student, targets[keep], reduction="sum")
        return loss, int(keep.sum())


def text_rows(tokenizer, texts: list[str], max_len: int) -> list[Row]:
    """Plain text cut into ``max_len``-token rows; every next token is a target, attention causal."""
    rows = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
        for a in range(0, len(ids) - 1, max_len):
            chunk = ids[a:a + max_len]
            if len(chunk) < 2:
                continue
            n = len(chunk)
            rows.append(Row(ids=chunk, positions=np.arange(n), turns=np.zeros(n, np.int64),
                            segments=np.zeros(n, np.int64), loss=np.ones(n, bool)))
    return rows


def run_distill(student_path: str, teacher_path: str | None, out: str, config: TrainConfig, *,
                data: list[str] | None = None, resume: bool = False, progress: bool = True, log=print) -> dict:
    from ..core.fidelity import token_map
    from ..core.load import PRUNING_RECORD, load_checkpoint, load_named, pruning_record, teacher_of
    from ..core.save import save_checkpoint
    from ..models.decoder import Decoder

    teacher_path = teacher_path or teacher_of(student_path)
    if os.path.exists(os.path.join(out, RECORD)) and not resume:
        raise InputError(f"{out}: already holds a finished run; choose another --out (or --resume an interrupted one)")
    t0 = time.perf_counter()
    student_ckpt, teacher_ckpt = load_checkpoint(student_path), load_named(teacher_path)
    to_teacher = token_map(student_ckpt.tokenizer, teacher_ckpt.tokenizer, where=student_path)
    rows, data_name = distill_rows(student_ckpt, data, config)
    teacher = Decoder.from_state_dict(teacher_ckpt.config, teacher_ckpt.state_dict).requires_grad_(False)
    student = Decoder.from_state_dict(student_ckpt.config, student_ckpt.state_dict)
    seed_everything(config.seed)
    model = lora(student, config) if config.lora_rank else student
    share = trainable_share(model)
    log(f"distilling {student_path} from {teacher_path}: {'LoRA' if config.lora_rank else 'full-parameter'}, "
        f"{share['trainable']:,} trainable of {share['total']:,}; {len(rows)} rows, "
        f"{sum(ReplyLoss.count(r) for r in rows):,} target tokens")
    loss = DistillLoss(teacher, to_teacher, mask_of(config), temperature=config.temperature, lm_weight=config.lm_weight)
    result = train(model, rows, loss, config, out, resume=resume, progress=progress, log=log)
    if config.lora_rank:
        model = model.merge_and_unload()
    student_ckpt = student_ckpt.replace(state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    record = {"kind": "distill", "student": os.path.abspath(student_path),
              "teacher": {"path": teacher_path, "source": teacher_ckpt.source}, "data": data_name,
              "config": config.to_dict(), "parameters": share, "seconds": round(time.perf_counter() - t0, 1), **result}
    records = {RECORD: record}
    pruning = pruning_record(student_path)
    if pruning is not None:
        records[PRUNING_RECORD] = pruning  # eval-fidelity still finds the teacher
    save_checkpoint(student_ckpt, os.path.join(out, "model"), records=records, force=True)
    write_text_atomic(os.path.join(out, RECORD), [json.dumps(record, indent=1, ensure_ascii=False)])
    return record


def distill_rows(student_ckpt, data: list[str] | None, config: TrainConfig) -> tuple[list[Row], object]:
    """Rows to distill on, in the student's tokens: text files and BELLE .jsonl dialogues, or the calibration
    text pruning used; and how the record names them."""
    from ..core.dialogues import read_dialogues
    from ..core.texts import calibration_description, calibration_texts

    if not data:
        rows = text_rows(student_ckpt.tokenizer, calibration_texts(), config.max_len)
        return sample_rows(rows, config), "calibration text: " + calibration_description()
    texts, dialogues = [], []
    for path in data:
        if path.endswith(".jsonl"):
            dialogues += read_dialogues(path)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--data {path}: cannot read as UTF-8 text ({e})") from None
    examples = [encode_dialogue(d, student_ckpt.tokenizer, student_ckpt.chat_format) for d in dialogues]
    rows = pack(examples, config.max_len)[0] + text_rows(student_ckpt.tokenizer, texts, config.max_len)
    return sample_rows(rows, config), [os.path.abspath(p) for p in data]

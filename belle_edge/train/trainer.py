"""The training loop SFT and distillation share: gradient accumulation, AdamW, linear warm-up then linear
decay, gradient clipping, a fixed seed, progress bars, checkpoints and resume.

A checkpoint (``<out>/checkpoints/step-N/``) holds the trainable tensors, the optimizer and scheduler state
and the step; ``state.json`` is written last, so a folder without it is an interrupted save and is ignored
on resume. Resuming replays the same shuffled order and skips the steps already taken.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..core.folders import sync_dir, sync_tree
from ..errors import InputError

KEEP_CHECKPOINTS = 2
DEFAULT_SFT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "sft.json")


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-5
    batch_size: int = 16          # packed rows per optimizer step (gradient accumulation, one row per forward)
    epochs: float = 3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 1024           # tokens per packed row
    lora_rank: int = 16           # 0: full-parameter training
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    window: int | None = 3        # the runtime's turn window (None: plain causal)
    sinks: int = 4
    seed: int = 42
    save_every: int = 50          # optimizer steps between checkpoints (and one at the end)
    held_out: float = 0.1         # share of dialogues kept out of training for evaluation
    temperature: float = 1.0      # distillation: softmax temperature of the KL term
    lm_weight: float = 0.0        # distillation: weight of the language-model loss added to the KL
    max_rows: int = 0             # train on at most this many packed rows (a seeded sample; 0 = all)
    notes: str = "none"           # "rules": place the automatic pinned notes a session would (runtime/notes.py)

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None) -> "TrainConfig":
        data = {}
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: not a readable JSON training config ({e})") from None
            if not isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InputError(f"{path or 'training config'}: unknown fields {unknown}; known: {sorted(known)}")
        if "lora_targets" in data:
            data["lora_targets"] = tuple(data["lora_targets"])
        cfg = cls(**data)
        cfg.check(path or "training config")
        return cfg

    def check(self, where: str) -> None:
        if self.notes not in ("none", "rules"):
            raise InputError(f"{where}: field notes: expected \"none\" or \"rules\", got {self.notes!r}")
        for name in ("learning_rate", "epochs", "temperature", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise InputError(f"{where}: field {name}: expected a positive number, got {value!r}")
        for name in ("batch_size", "max_len", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{where}: field {name}: expected a positive whole number, got {value!r}")
        for name in ("warmup_steps", "lora_rank", "save_every", "max_rows", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{where}: field {name}: expected a whole number >= 0, got {value!r}")
        if not 0 <= self.held_out < 1:
            raise InputError(f"{where}: field held_out: expected a share in [0, 1), got {self.held_out!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_rows(rows: list, config: TrainConfig) -> list:
    """At most ``config.max_rows`` rows, a seeded sample in the original order (all of them when 0)."""
    if not config.max_rows or len(rows) <= config.max_rows:
        return rows
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(rows))[:config.max_rows])
    return [rows[i] for i in keep]


def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then linear decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model: torch.nn.Module, rows: list, loss_fn, config: TrainConfig, out: str, *, resume: bool = False,
          progress: bool = True, log=print) -> dict:
    """Optimise the parameters of ``model`` that require grad. ``loss_fn(model, row) -> (loss_sum, tokens)``
    returns a summed loss and the number of tokens it covers; a step's loss is the sum over its rows divided
    by their tokens, so every target token weighs the same however the rows are packed."""
    from tqdm import tqdm

    if not rows:
        raise InputError("training data: no rows to train on (every dialogue was empty or longer than max_len)")
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, config.warmup_steps))
    step, history = 0, []
    ckpt_root = os.path.join(out, "checkpoints")
    seed_everything(config.seed)
    if resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            log(f"resume: no complete checkpoint under {ckpt_root}; starting from step 0")
        else:
            step, history = _restore(latest, model, names, optimizer, scheduler)
            log(f"resumed from {latest} (step {step} of {total})")
    model.train()
    bar = tqdm(total=total, initial=step, disable=not progress, file=sys.stderr, unit="step", desc="train")
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        order = np.random.default_rng(config.seed + epoch).permutation(len(rows))  # the same on resume
        batch = [rows[i] for i in order[index * config.batch_size:(index + 1) * config.batch_size]]
        tokens = sum(int(loss_fn.count(r)) for r in batch)
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for row in batch:
            loss_sum, _ = loss_fn(model, row)
            (loss_sum / tokens).backward()
            loss_total += loss_sum.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        step += 1
        history.append({"step": step, "loss": round(loss_total / tokens, 5), "tokens": tokens,
                        "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total / tokens:.4f}")
        if step == total or (config.save_every and step % config.save_every == 0):
            _save(os.path.join(ckpt_root, f"step-{step}"), model, names, optimizer, scheduler, step, history)
    bar.close()
    model.eval()
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "rows": len(rows), "history": history}


def latest_checkpoint(root: str) -> str | None:
    if not os.path.isdir(root):
        return None
    done = _steps(root)
    return os.path.join(root, f"step-{done[-1]}") if done else None


def _steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending (``step-N.partial`` is not one)."""
    names = (re.fullmatch(r"step-(\d+)", d) for d in os.listdir(root))
    return sorted(int(m.group(1)) for m in names if m and os.path.isfile(os.path.join(root, m.group(0), "state.json")))


def _save(folder, model, names, optimizer, scheduler, step, history) -> None:
    from safetensors.torch import save_file

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().contiguous() for n in names}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:  # last: marks the checkpoint complete
        json.dump({"step": step, "history": history}, f)
    sync_tree(tmp)  # on disk before the rename marks it the latest (a power cut, not only a kill)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    root = os.path.dirname(folder)
    sync_dir(root)
    for old in _steps(root)[:-KEEP_CHECKPOINTS]:  # a full-parameter checkpoint is weights + 2 AdamW moments
        shutil.rmtree(os.path.join(root, f"step-{old}"), ignore_errors=True)


def _restore(folder, model, names, optimizer, scheduler):
    from safetensors.torch import load_file

    saved = load_file(os.path.join(folder, "trainable.safetensors"))
    if sorted(saved) != sorted(names):
        raise InputError(f"{folder}: its trainable tensors do not match this run's (another model or LoRA setting)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(saved[n])
    state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])  # dropout continues as an uninterrupted run would
    with open(os.path.join(folder, "state.json")) as f:
        meta = json.load(f)
    return meta["step"], meta["history"]

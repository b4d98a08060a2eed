"""``belle-edge train sft``: LoRA fine-tuning on dialogues, loss on the assistant's tokens only, rows packed
with the runtime's turn-window mask (``collate.py``), on the canonical model through peft.

The run folder holds ``adapter/`` (peft's format), ``checkpoints/`` (resume), ``training.json`` (config,
data counts, trainable share, loss history) and the dialogue split (``train.jsonl``, ``held_out.jsonl``).
``belle-edge train merge RUN --out DIR`` folds the adapter into a checkpoint ``compile`` takes.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ..default_model import DEFAULT
from ..errors import InputError
from ..mask import MaskConfig
from ..core.rows import ReplyLoss, encode_dialogue, pack, training_notes
from ..core.folders import write_text_atomic
from .trainer import TrainConfig, sample_rows, seed_everything, train

RECORD = "training.json"


def mask_of(config: TrainConfig) -> MaskConfig:
    return MaskConfig(window=config.window, sinks=config.sinks) if config.window is not None else MaskConfig.off()


def split(dialogues: list, share: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, the held-out share taken from its end."""
    order = np.random.default_rng(seed).permutation(len(dialogues))
    n_held = int(round(share * len(dialogues)))
    held = sorted(order[len(order) - n_held:]) if n_held else []
    held_set = set(held)
    return [d for i, d in enumerate(dialogues) if i not in held_set], [dialogues[i] for i in held]


def lora(model, config: TrainConfig):
    """The peft-wrapped model with LoRA on ``config.lora_targets``; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(config.lora_targets)
    if tuple(targets) == TrainConfig.lora_targets:  # the default list: what this family has (BLOOM: no gate_proj)
        targets = [t for t in targets if t in present]
    missing = [t for t in targets if t not in present]
    if missing:
        raise InputError(f"lora_targets {missing}: not modules of this model (it has q_proj, k_proj, v_proj, o_proj, "
                         "up_proj, down_proj and, for LLaMA, gate_proj)")
    return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                            lora_dropout=config.lora_dropout, target_modules=targets))


def trainable_share(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": round(trainable / total, 6)}


def run_sft(model_path: str | None, data_path: str, out: str, config: TrainConfig, *, resume: bool = False,
            progress: bool = True, log=print) -> dict:
    from ..core.load import load_checkpoint
    from ..models.decoder import Decoder
    from ..core.dialogues import read_dialogues, write_dialogues

    if config.lora_rank == 0:
        raise InputError("train sft: lora_rank 0 would train every weight; SFT here is LoRA (rank >= 1)")
    if os.path.exists(os.path.join(out, RECORD)) and not resume:
        raise InputError(f"{out}: already holds a finished run; choose another --out (or --resume an interrupted one)")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(model_path)
    dialogues = read_dialogues(data_path)
    train_set, held = split(dialogues, config.held_out, config.seed)
    if not train_set:
        raise InputError(f"{data_path}: no dialogues left to train on after holding out {config.held_out:.0%}")
    examples = [encode_dialogue(d, ckpt.tokenizer, ckpt.chat_format, notes=training_notes(d, config))
                for d in train_set]
    rows, too_long = pack(examples, config.max_len)
    rows = sample_rows(rows, config)
    os.makedirs(out, exist_ok=True)
    write_dialogues(train_set, os.path.join(out, "train.jsonl"))
    write_dialogues(held, os.path.join(out, "held_out.jsonl"))

    seed_everything(config.seed)  # LoRA's initial A matrices come from torch's generator
    model = lora(Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source), config)
    share = trainable_share(model)
    log(f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}: {share['trainable']:,} trainable "
        f"parameters of {share['total']:,} ({share['share']:.2%})")
    log(f"data: {len(train_set)} dialogues ({sum(len(d.turns) for d in train_set)} turns) in {len(rows)} packed rows "
        f"of <= {config.max_len} tokens; {len(held)} held out; {too_long} dropped as longer than max_len")
    result = train(model, rows, ReplyLoss(mask_of(config)), config, out, resume=resume, progress=progress, log=log)
    model.save_pretrained(os.path.join(out, "adapter"))
    record = {"kind": "sft-lora", "base": {"path": model_path or DEFAULT, "source": ckpt.source},
              "data": {"path": os.path.abspath(data_path), "dialogues": len(dialogues), "train": len(train_set),
                       "held_out": len(held), "dropped_too_long": too_long, "rows": len(rows),
                       "target_tokens": sum(ReplyLoss.count(r) for r in rows)},
              "config": config.to_dict(), "parameters": share, "mask": {"window": config.window, "sinks": config.sinks},
              "seconds": round(time.perf_counter() - t0, 1), **result}
    write_text_atomic(os.path.join(out, RECORD), [json.dumps(record, indent=1, ensure_ascii=False)])
    return record


def run_merge(run: str, out: str, *, base: str | None = None, force: bool = False) -> str:
    """Fold the run's LoRA adapter into its base model and write a checkpoint ``compile`` takes."""
    from peft import PeftModel

    from ..core.load import PRUNING_RECORD, load_named, pruning_record
    from ..core.save import save_checkpoint
    from ..models.decoder import Decoder

    record_path = os.path.join(run, RECORD)
    adapter = os.path.join(run, "adapter")
    if not os.path.isdir(adapter):
        raise InputError(f"{run}: no adapter/ folder (not a finished `belle-edge train sft` run)")
    record = {}
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    if base is None:
        base = record.get("base", {}).get("path")
        if base is None:
            raise InputError(f"{record_path}: no base model recorded; pass --base")
    ckpt = load_named(base)
    model = PeftModel.from_pretrained(Decoder.from_state_dict(ckpt.config, ckpt.state_dict), adapter)
    merged = model.merge_and_unload()
    ckpt = ckpt.replace(state_dict={k: v.detach().clone() for k, v in merged.state_dict().items()})
    records = {RECORD: {**record, "merged_from": os.path.abspath(run)}}
    pruning = pruning_record(base) if os.path.isdir(base) else None
    if pruning is not None:  # a fine-tuned pruned model keeps its pruning record
        records[PRUNING_RECORD] = pruning
    return save_checkpoint(ckpt, out, records=records, force=force)

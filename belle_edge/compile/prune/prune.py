"""The prune pass: a checkpoint -> a smaller checkpoint of the same architecture, and the record of how.

    calibration pass (stats) ─▶ vocabulary (mix) ─▶ solver (plan) ─▶ selection ─▶ slice ─▶ checkpoint

``prune_checkpoint`` is the one entry; ``belle-edge prune`` writes its result as a Hugging Face directory
(``compile/save.py``) and ``belle-edge compile --prune-*`` runs it as the stage after load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...errors import InputError
from ...core.texts import calibration_description, calibration_texts
from .calibration import Stats, calibration_ids, collect_stats
from .plan import MODES, TOLERANCE, Plan, count_params, render, solve
from .slicing import Selection, slice_model


@dataclass(frozen=True)
class PruneRequest:
    target_params: int | None = None
    ratio: float | None = None               # of the source's parameters; exactly one of the two
    mode: str = "mix"                        # mix | width | depth
    calibration: tuple[str, ...] | None = None   # texts; None: the default English + Chinese calibration text
    calibration_name: str | None = None  # None: the default texts, named by core/texts.py
    calibration_tokens: int = 4096
    vocab_corpus: tuple[str, ...] | None = None  # mix: the tokens to keep come from here (default: calibration)
    multiple_of: int = 8                     # hidden and MLP widths, where the target allows
    dry_run: bool = False                    # stop after printing the plan

    def __post_init__(self):
        if (self.target_params is None) == (self.ratio is None):
            raise InputError("prune: give exactly one of --target-params N or --ratio R")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise InputError(f"--ratio: expected a fraction between 0 and 1, got {self.ratio}")
        if self.target_params is not None and self.target_params <= 0:
            raise InputError(f"--target-params: expected a positive count, got {self.target_params}")
        if self.mode not in MODES:
            raise InputError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calibration_tokens < 16:
            raise InputError(f"--calibration-tokens: expected at least 16, got {self.calibration_tokens}")


@dataclass
class PruneResult:
    checkpoint: object | None        # the pruned Checkpoint (None for a dry run)
    plan: Plan
    record: dict = field(default_factory=dict)   # what pruning.json / the manifest keep
    trim: object | None = None       # the VocabTrim when the vocabulary shrank
    tokenizer_config: dict | None = None  # the source's tokenizer_config.json re-keyed to the trimmed vocabulary


def prune_checkpoint(ckpt, req: PruneRequest, *, log=print) -> PruneResult:
    """calibration stats -> vocabulary (mix) -> the solver's plans -> selections -> the best candidate, cut."""
    from ...models.decoder import Decoder

    t0 = time.perf_counter()
    target = req.target_params if req.target_params is not None else round(req.ratio * count_params(ckpt.config))
    texts = list(req.calibration) if req.calibration is not None else calibration_texts()
    chunks = calibration_ids(ckpt.tokenizer, texts, tokens=req.calibration_tokens)
    trim = None
    if req.mode == "mix":
        trim = _vocabulary(ckpt, list(req.vocab_corpus) if req.vocab_corpus is not None else texts)
    plans = solve(ckpt.config, target, req.mode, vocab=len(trim.old_ids) if trim else None,
                  multiple=req.multiple_of)
    teacher = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source)
    stats = collect_stats(teacher, chunks)
    candidates = [(plan, select(plan, stats, trim)) for plan in plans]
    scores, pruned = _score_candidates(ckpt, teacher, candidates, texts, trim) if len(candidates) > 1 else ([], None)
    plan, sel = candidates[scores.index(min(scores)) if scores else 0]
    _log_plan(log, plan, sel, candidates, scores, trim)
    record = {"plan": plan.to_dict(), "layers_kept": sel.layers,
              "calibration": {"text": req.calibration_name or calibration_description(), "tokens": stats.tokens},
              "block_influence": [round(b, 5) for b in stats.block_influence],
              "vocabulary": None if trim is None else {"kept": len(trim.old_ids), "source": ckpt.config.vocab_size},
              "candidates": [{"layers": p.shape.layers, "params": p.params_after, "calibration_kl": s}
                             for (p, _), s in zip(candidates, scores)]}
    if req.dry_run:
        return PruneResult(None, plan, record, trim)
    if pruned is None:
        pruned = _student(ckpt, plan, sel, trim)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    tokenizer_config = None
    if trim is not None:
        from ...core.save import source_tokenizer_config
        from .vocab import remap_tokenizer_config

        tokenizer_config = remap_tokenizer_config(source_tokenizer_config(ckpt), trim)
    return PruneResult(pruned, plan, record, trim, tokenizer_config)


def _score_candidates(ckpt, teacher, candidates, texts: list[str], trim) -> tuple[list[float], object]:
    """The solver's mix: each depth/width split's mean KL to the teacher on the calibration texts. Returns the
    scores and the best candidate's pruned checkpoint (only the best so far is kept: one copy in memory)."""
    from ...core.fidelity import measure
    from ...models.decoder import Decoder

    cal_texts = {f"calibration {i}": t for i, t in enumerate(texts)}
    teacher_logits = {}  # every candidate shares the tokenizer: the teacher runs once per text
    scores, best = [], None
    for plan, sel in candidates:
        student = _student(ckpt, plan, sel, trim)
        m = measure(teacher, ckpt.tokenizer, Decoder.from_state_dict(student.config, student.state_dict),
                    student.tokenizer, texts=cal_texts, tokens=512, teacher_logits=teacher_logits)
        scores.append(sum(r["kl_mean"] for r in m["texts"].values()) / len(m["texts"]))
        if scores[-1] == min(scores):
            best = student
    return scores, best


def _log_plan(log, plan: Plan, sel: Selection, candidates, scores: list[float], trim) -> None:
    """The plan as printed before anything is written."""
    extra = []
    if scores:
        extra.append("  mix candidates (layers kept: calibration KL): " + ", ".join(
            f"{p.shape.layers}: {s:.4f}" for (p, _), s in zip(candidates, scores)))
    if trim is not None:
        extra.append(f"  vocabulary kept: the {len(trim.old_ids):,} tokens the corpus, the specials and the chat "
                     "format use (other text falls back to byte tokens)")
    log(render(plan, layers_kept=sel.layers, extra=extra))
    if abs(plan.deviation) > TOLERANCE:
        log(f"  note: {plan.mode} pruning moves in whole steps here; the nearest count is {plan.deviation:+.1%} "
            "off the target")


# ------------------------------------------------------------------------------------------- vocabulary
def _vocabulary(ckpt, corpus: list[str]):
    from .vocab import corpus_token_ids, trim_vocabulary

    fmt = ckpt.chat_format
    chat_text = fmt.system_text("S") + fmt.first_turn_text(None, "M") + fmt.turn_text("M") + fmt.reply_end
    keep = corpus_token_ids(ckpt.tokenizer, corpus + [chat_text])
    keep |= set(ckpt.stop_token_ids) | set(ckpt.config.eos_token_ids)
    if ckpt.config.bos_token_id is not None:
        keep.add(ckpt.config.bos_token_id)
    extra = [t for t in (getattr(fmt, "bos_token", None), getattr(fmt, "eos_token", None), fmt.end_token) if t]
    return trim_vocabulary(ckpt.tokenizer, keep, extra_tokens=extra, where=ckpt.source)


# ------------------------------------------------------------------------------------------- selection
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def select(plan: Plan, stats: Stats, trim) -> Selection:
    """Which vocabulary rows, layers, heads and channels fill the plan's shape: the most important ones."""
    cfg, s = plan.source, plan.shape
    sel = Selection()
    if trim is not None:
        sel.vocab = torch.tensor(trim.old_ids, dtype=torch.long)
    if s.layers < cfg.num_layers:
        bi = torch.tensor(stats.block_influence)
        sel.layers = sorted(bi.topk(s.layers).indices.tolist())
    if s.hidden < cfg.hidden_size:
        sel.hidden = _top(stats.hidden, s.hidden)
    layers = sel.layers if sel.layers is not None else range(cfg.num_layers)
    for i in layers:
        if s.intermediate < cfg.intermediate_size:
            sel.mlp[i] = _top(stats.mlp[i], s.intermediate)
        if s.head_dim < cfg.head_dim:  # every head stays and keeps its most useful dims
            for name in ("qk_dims", "v_dims"):
                per_head = getattr(stats, name)[i].view(cfg.num_heads, cfg.head_dim)
                getattr(sel, name)[i] = per_head.topk(s.head_dim, -1).indices.sort(-1).values
        elif s.kv_heads * s.group < cfg.num_heads:  # whole heads go, in GQA groups
            per_group = stats.q_heads[i].view(cfg.num_kv_heads, cfg.group_size)
            best = per_group.topk(s.group, -1)
            kv = _top(best.values.sum(-1), s.kv_heads)
            q = [kv_i * cfg.group_size + best.indices[kv_i].sort().values for kv_i in kv.tolist()]
            sel.kv_heads[i], sel.q_heads[i] = kv, torch.cat(q)
    return sel


def _student(ckpt, plan: Plan, sel: Selection, trim):
    """The pruned Checkpoint: config, weights, tokenizer, chat format and stop tokens, ids remapped."""
    from ...core.checkpoint import Checkpoint

    cfg = plan.config
    stop = set(ckpt.stop_token_ids)
    tokenizer = ckpt.tokenizer
    if trim is not None:
        def new(i):
            return None if i is None else trim.new_id(i)
        cfg = cfg.replace(bos_token_id=new(cfg.bos_token_id),
                          eos_token_ids=tuple(j for j in map(new, cfg.eos_token_ids) if j is not None))
        stop = {j for j in map(new, stop) if j is not None}
        tokenizer = trim.tokenizer
    state = slice_model(ckpt.config, ckpt.state_dict, sel, cfg)
    return Checkpoint(cfg, state, tokenizer, ckpt.chat_format, frozenset(stop), ckpt.source, ckpt.kind)

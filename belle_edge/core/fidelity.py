"""How closely one model follows another: teacher-forced KL divergence, top-1 agreement and the perplexity
ratio, on held-out text. Pruning ranks its candidates with it, the compile fidelity stage checks a quantized
or half-precision artifact with it, ``belle-edge eval-fidelity`` reports it, distillation maps vocabularies
with :func:`token_map`.

The student may have a smaller vocabulary (vocabulary pruning). Both models read the student's
tokenization of the text (every student token is a teacher token, matched by its string), and both
distributions are renormalised over the shared vocabulary, so the three figures compare like with like.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError
from ..mask import MaskConfig
from .texts import held_out_texts


def forward_chunks(model, chunks: list[np.ndarray], *, seq: int = 512):
    """Teacher-forced logits of every chunk, split into ``seq``-token sequences (each from position 0)."""
    for chunk in chunks:
        for a in range(0, len(chunk), seq):
            ids = chunk[a:a + seq]
            if len(ids) < 2:
                continue
            yield ids, model(torch.from_numpy(ids)[None], np.arange(len(ids)), np.zeros(len(ids), np.int64),
                             MaskConfig.off())[0]


def token_map(student_tok, teacher_tok, *, where: str = "student") -> torch.Tensor:
    """Teacher id of every student token id (matched by token string)."""
    sv, tv = student_tok.get_vocab(with_added_tokens=True), teacher_tok.get_vocab(with_added_tokens=True)
    missing = [t for t in sv if t not in tv]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} of its {len(sv)} tokens are not in the teacher's vocabulary "
                              f"(e.g. {missing[0]!r}); fidelity needs a student tokenizer cut from the teacher's")
    out = torch.empty(max(sv.values()) + 1, dtype=torch.long)
    for token, i in sv.items():
        out[i] = tv[token]
    return out


def _logits(model, ids: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.cat([logits for _, logits in forward_chunks(model, [ids.numpy()], seq=seq)])


@torch.no_grad()
def compare(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Figures over (T, V) logits already restricted to the same columns; with ``targets`` (T-1,), the next
    tokens as column indices, the perplexities too. The compile fidelity stage uses it
    without targets."""
    lt = torch.log_softmax(teacher_logits.double(), -1)
    ls = torch.log_softmax(student_logits.double(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    out = {"kl_mean": round(float(kl.mean()), 5), "kl_p95": round(float(kl.quantile(0.95)), 5),
           "top1_agreement": round(float((lt.argmax(-1) == ls.argmax(-1)).double().mean()), 4),
           "tokens": int(lt.shape[0])}
    if targets is not None:
        nll_t = -lt[:-1].gather(1, targets[:, None]).squeeze(1)
        nll_s = -ls[:-1].gather(1, targets[:, None]).squeeze(1)
        ppl_t, ppl_s = float(nll_t.mean().exp()), float(nll_s.mean().exp())
        out.update(ppl_teacher=round(ppl_t, 3), ppl_student=round(ppl_s, 3), ppl_ratio=round(ppl_s / ppl_t, 4))
    return out


def measure(teacher, teacher_tok, student, student_tok, *, texts: dict[str, str] | None = None,
            tokens: int = 1024, seq: int = 512, where: str = "student", teacher_logits: dict | None = None) -> dict:
    """Fidelity of ``student`` to ``teacher`` (canonical Decoders) on each text, over the shared vocabulary.
    ``teacher_logits`` (a dict, filled here) keeps the teacher's logits per text for later calls whose
    students share this student's tokenizer."""
    cache = {} if teacher_logits is None else teacher_logits
    to_teacher = token_map(student_tok, teacher_tok, where=where)
    shared = to_teacher.shape[0]
    if shared > student.cfg.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {shared} tokens but the model's vocab_size is "
                              f"{student.cfg.vocab_size}")
    out = {"shared_vocab": shared, "teacher_vocab": teacher.cfg.vocab_size, "texts": {}}
    for name, text in (texts or held_out_texts()).items():
        ids = torch.tensor(student_tok.encode(text, add_special_tokens=False).ids[:tokens], dtype=torch.long)
        if len(ids) % seq == 1:  # a 1-token last chunk has no prediction to compare: leave that token out
            ids = ids[:-1]
        if len(ids) < 2:
            raise CheckpointError(f"evaluation text {name}: tokenizes to fewer than 2 tokens")
        if name not in cache:
            cache[name] = _logits(teacher, to_teacher[ids], seq)[:, to_teacher]
        t_logits = cache[name]
        s_logits = _logits(student, ids, seq)[:, :shared]
        out["texts"][name] = compare(t_logits, s_logits, ids[1:])
    return out

"""``belle-edge eval-fidelity``: the fidelity measures of :mod:`belle_edge.core.fidelity` on checkpoints on
disk, with the teacher a pruned checkpoint names in its ``pruning.json``, and the table it prints."""
from __future__ import annotations

from ..core.fidelity import measure


def eval_fidelity(student_path: str, teacher_path: str | None = None, *, tokens: int = 1024,
                  texts: dict[str, str] | None = None) -> dict:
    """The ``belle-edge eval-fidelity`` measure: checkpoints on disk; the teacher defaults to the one named
    in the student's ``pruning.json``."""
    from ..core.load import load_checkpoint, load_named, teacher_of
    from ..models.decoder import Decoder

    teacher_path = teacher_path or teacher_of(student_path)
    student_ckpt = load_checkpoint(student_path)
    teacher_ckpt = load_named(teacher_path)
    teacher = Decoder.from_state_dict(teacher_ckpt.config, teacher_ckpt.state_dict, where=teacher_ckpt.source)
    student = Decoder.from_state_dict(student_ckpt.config, student_ckpt.state_dict, where=student_ckpt.source)
    result = measure(teacher, teacher_ckpt.tokenizer, student, student_ckpt.tokenizer, texts=texts, tokens=tokens,
                     where=student_path)
    return {"student": student_path, "teacher": teacher_path, **result}


def format_table(result: dict) -> str:
    lines = [f"{'text':<28}{'tokens':>7}{'KL':>9}{'KL p95':>9}{'top-1':>8}{'ppl T':>9}{'ppl S':>9}{'ratio':>8}"]
    for name, r in result["texts"].items():
        lines.append(f"{name:<28}{r['tokens']:>7}{r['kl_mean']:>9.4f}{r['kl_p95']:>9.4f}{r['top1_agreement']:>8.1%}"
                     f"{r['ppl_teacher']:>9.2f}{r['ppl_student']:>9.2f}{r['ppl_ratio']:>8.3f}")
    lines.append(f"(shared vocabulary {result['shared_vocab']:,} of the teacher's {result['teacher_vocab']:,})")
    return "\n".join(lines)

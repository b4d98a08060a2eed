"""The prune stage: a checkpoint -> a smaller checkpoint folder (stock Hugging Face layout) with
``pruning.json``: the plan, its calibration, the fidelity to the unpruned model on held-out text, and the
teacher that distillation recovers from. ``belle-edge prune`` and ``compile --prune-*`` both run
:func:`prune_to_folder`; in a compile the folder is the hand-off to the next stage.

Details recorded (= ``pruning.json``): ``plan``, ``layers_kept``, ``calibration``, ``block_influence``,
``vocabulary``, ``candidates``, ``seconds``, ``fidelity`` (core/fidelity.measure), ``teacher``; in a compile
also ``memory`` (the target's budget for the pruned model).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from ...core.checkpoint import Checkpoint
from ...core.fidelity import measure
from ...core.load import PRUNING_RECORD
from ...core.save import save_checkpoint
from ...core.stage import measured
from ...core.texts import held_out_texts
from ...manifest import StageRecord
from ...targets import MemoryBudget
from .prune import PruneRequest, PruneResult, prune_checkpoint

if TYPE_CHECKING:
    from ..job import Job



def prune_to_folder(ckpt: Checkpoint, request: PruneRequest, out: str | None, *, teacher: str,
                    force: bool = False, log: Callable[[str], None] = print) -> tuple[PruneResult, dict]:
    """Prune ``ckpt`` and write the result to ``out`` (not for a dry run); ``teacher`` is how later tools
    find the unpruned model again (a known model's name or its path). Returns the result, whose checkpoint now reads
    from ``out``, and the record written to ``pruning.json``."""
    from ...models.decoder import Decoder

    result = prune_checkpoint(ckpt, request, log=log)
    if request.dry_run:
        return result, result.record
    log("measuring fidelity to the unpruned model on held-out text ...")
    fidelity = measure(Decoder.from_state_dict(ckpt.config, ckpt.state_dict, where=ckpt.source), ckpt.tokenizer,
                       Decoder.from_state_dict(result.checkpoint.config, result.checkpoint.state_dict),
                       result.checkpoint.tokenizer, texts=held_out_texts())
    record = {**result.record, "fidelity": fidelity,
              "teacher": {"path": teacher, "source": ckpt.source, "fingerprint": ckpt.fingerprint}}
    path = save_checkpoint(result.checkpoint, out, records={PRUNING_RECORD: record}, force=force,
                           tokenizer_config=result.tokenizer_config)
    return replace(result, checkpoint=result.checkpoint.replace(source=path, kind="hf"), record=record), record


@dataclass(frozen=True)
class PruneStage:
    request: PruneRequest
    teacher: str  # a known model's name or the source's path, as pruning.json records it
    budget: MemoryBudget | None = None

    name = "prune"
    reads = "checkpoint (in memory from the load stage)"
    writes = "pruned checkpoint folder: Hugging Face layout + pruning.json"

    def run(self, job: "Job") -> StageRecord:
        out = job.scratch(self.name)
        return measured(self, lambda: self._prune(job, out), reads=job.checkpoint().source, writes=(out,))

    def _prune(self, job: "Job", out: str) -> dict:
        result, record = prune_to_folder(job.checkpoint(), self.request, out, teacher=self.teacher,
                                         log=lambda line: print(line, file=sys.stderr))
        pruned = result.checkpoint
        job.hand_on(out, pruned)
        job.reference = pruned  # quantization is measured against the pruned model, not the source
        details = dict(record)
        if self.budget is not None:
            details["memory"] = self.budget.check(pruned.config, pruned.parameters)
        return details

"""Training that feeds the pipeline: data cleaning (``clean``), LoRA fine-tuning with the turn-window mask
(``sft``), distillation to win back what pruning cost (``distill``), adapter merging (``merge``).

Every output is a checkpoint that ``belle-edge compile`` takes as it is. BELLE's data formats
(core/dialogues.py) and the packed rows with the runtime's mask (core/rows.py) live in the core, which
evaluation shares; ``trainer`` is the loop SFT and distillation share.
"""

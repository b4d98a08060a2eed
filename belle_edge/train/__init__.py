"""Training that feeds the pipeline: data cleaning (``clean``), LoRA fine-tuning with the turn-window mask
(``sft``), distillation to win back what pruning cost (``distill``), adapter merging (``merge``).

Every output is a checkpoint that ``belle-edge compile`` takes as it is. ``data`` reads BELLE's formats,
``collate`` turns dialogues into packed rows with the runtime's mask, ``trainer`` is the loop they share.
"""

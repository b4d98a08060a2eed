"""The neutral core, below every stage and tool: what several of them share.

``checkpoint`` (the frozen ``Checkpoint``), ``load`` / ``hf_dir`` / ``gguf`` (opening one), ``save`` (writing
one), ``quantized`` (block-quantized weights and their folder), ``folders`` (whole-or-nothing writes),
``stage`` (what a compiler stage is), ``texts`` (calibration and held-out text), ``fidelity`` (how closely one
model follows another), ``dialogues`` (BELLE dialogue data), ``rows`` (dialogues as training rows).
Nothing here imports a stage, a tool or the CLI.
"""

"""Structured pruning to a parameter budget: vocabulary, width (heads, MLP channels, hidden size) and depth.

``stage`` is the compiler stage (``prune_to_folder``: prune, measure, write); ``prune.prune_checkpoint`` the
pass itself; ``plan`` the solver, ``calibration`` the measures that rank what to keep, ``slicing`` the cut,
``vocab`` the tokenizer rewrite.
"""

"""Structured pruning to a parameter budget: vocabulary, width (heads, MLP channels, hidden size) and depth.

``prune.prune_checkpoint`` is the pass; ``plan`` the solver, ``calibration`` the measures that rank what to
keep, ``slicing`` the cut itself, ``vocab`` the tokenizer rewrite;
``belle_edge.core.save`` writes the Hugging Face output.
"""

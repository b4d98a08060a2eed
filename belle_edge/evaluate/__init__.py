"""Measuring models: fidelity of a pruned or quantized model to its source (``fidelity``), and the texts
those measures run on (``texts``)."""

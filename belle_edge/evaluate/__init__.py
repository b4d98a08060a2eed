"""Measuring models for people: ``eval-fidelity`` on checkpoints on disk (``fidelity``, over
core/fidelity.py), and reply quality on held-out dialogues (``replies``, ``generation``)."""

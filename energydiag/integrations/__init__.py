"""Recorders for the trainers people use: a callback instead of hand-written Recorder calls.

``energydiag.integrations.lightning`` (Lightning 2.x) and ``energydiag.integrations.hf``
(transformers' Trainer) import their trainer; this package itself imports neither.
"""

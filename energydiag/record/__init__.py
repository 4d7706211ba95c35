"""The recording side: the flight recorder a training loop calls (``recorder``), and callbacks
that call it for the trainers people use: ``energydiag.record.lightning`` (Lightning 2.x) and
``energydiag.record.hf`` (transformers' Trainer) import their trainer; this package itself
imports neither.
"""

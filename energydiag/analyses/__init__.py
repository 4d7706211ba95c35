"""Layer 5, analyses: inspect, bisect, timeline, curves, what-if, check and diagnose.

Each asks the io layer for data and the engine for steps, computes numbers, and hands them to
the rules in energydiag.findings. None of them opens a file or prints.
"""

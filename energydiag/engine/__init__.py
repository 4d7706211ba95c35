"""Layer 2, execution: the user's training step driven under one instrument.

Sessions rebuild a model and optimizer from a checkpoint, the probe observes a step (module
tracking plus a dispatch mode), quantities are the numbers measured on a step, replay and
localise re-run steps, and the Recorder writes run directories from a user's loop.
"""

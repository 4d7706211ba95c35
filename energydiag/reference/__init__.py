"""Layer 3, reference user code: the seed report's energy model, its losses, and a synthetic task
recorded through the Recorder. Built-in loss names resolve here by import string, so the engine
never imports this package.
"""

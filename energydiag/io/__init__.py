"""Layer 1, files: run directories, manifests, safetensors and torch checkpoints, metric logs.

Everything that opens a file lives here and turns a bad file into a one-line DiagError. Nothing
here runs a model.
"""

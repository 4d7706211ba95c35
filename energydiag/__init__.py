"""energydiag: turn a NaN or a flat-lining energy loss into evidence."""

from energydiag.recorder import Recorder

__version__ = "0.1.0"
__all__ = ["Recorder", "__version__"]

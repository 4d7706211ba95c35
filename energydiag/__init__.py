"""energydiag: turn a NaN or a flat-lining energy loss into evidence.

The package is layered, and imports only go downward:
errors -> io -> engine -> (integrations, reference) -> contrastive -> findings -> analyses ->
report -> cli.
``Recorder`` and ``__version__`` resolve lazily, so that ``energydiag --help`` loads neither torch
nor the package metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from energydiag.engine.recorder import Recorder

__all__ = ["Recorder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Recorder":
        from energydiag.engine.recorder import Recorder

        return Recorder
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("energydiag")
        except PackageNotFoundError:  # a source tree on sys.path without an install
            return "0+unknown"
    raise AttributeError(f"module 'energydiag' has no attribute {name!r}")

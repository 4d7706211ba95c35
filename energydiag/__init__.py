"""energydiag: turn a NaN or a flat-lining energy loss into evidence.

The package is layered, and imports only go downward:
errors -> io -> engine -> reference -> findings -> analyses -> report -> cli.
``Recorder`` is imported lazily so that ``energydiag --help`` does not load torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("energydiag")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from energydiag.engine.recorder import Recorder

__all__ = ["Recorder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Recorder":
        from energydiag.engine.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'energydiag' has no attribute {name!r}")

"""energydiag: turn a NaN or a flat-lining energy loss into evidence.

The package is layered; a module imports only its own layer and the ones above it in this list
(tests/test_layout.py checks it):

- ``errors``, ``schema``, ``exitcodes``: the one-line error, typed reports that round-trip JSON,
  how a command ends.
- ``io``: files. One format registry sniffs a file once; runs, manifests, tensors, metric logs.
- ``engine``: any model and loss on any batch under one instrument: the step contract, replay,
  localisation, the quantities of any model. It reads a loss's keyword arguments, never a
  temperature.
- ``record``: the flight recorder and the trainer callbacks.
- ``reference``: the seed energy model, its losses and a synthetic task (user-side code).
- ``contrastive``: what only energy models have, computed: energy statistics, InfoNCE bounds and
  candidates, the temperature and its source, the bounded-head finder, the doctor's quantities,
  the landscape.
- ``findings``: rules over typed evidence, each returning a Finding (a remedy, the commands that
  take it further), never computing.
- ``analyses``: compositions: inspection, timeline, curves, bisect, what-if, the Case and its
  story, the check gate.
- ``commands``: one module per command; ``run`` returns a typed report and an exit code.
- ``report``: renderers of those reports: terminal, JSON, JUnit/GitHub, PNG, HTML.
- ``testing``: ``assert_run_healthy`` for a project's own test suite.
- ``cli``: options declared once, commands in one table; it parses and renders.

``Recorder`` and ``__version__`` resolve lazily, so that ``energydiag --help`` loads neither torch
nor the package metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from energydiag.record.recorder import Recorder

__all__ = ["Recorder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Recorder":
        from energydiag.record.recorder import Recorder

        return Recorder
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("energydiag")
        except PackageNotFoundError:  # a source tree on sys.path without an install
            return "0+unknown"
    raise AttributeError(f"module 'energydiag' has no attribute {name!r}")

"""TensorBoard scalars from every event file under a folder, merged by step.

A training job leaves several event files: one per restart in the same folder, one per
sub-folder for ``add_scalars`` or a validation writer. Each file is read alone (so an error
names it), tags from a sub-folder are prefixed with its path (``val/loss``), and when two files
of one folder log a tag at the same step the later file wins (within a file, the later write),
as TensorBoard shows it after a restart. Scalars come from legacy simple values and from v2
tensor summaries (``tf.summary.scalar``, ``add_scalar(new_style=True)``), which store a 0-d
tensor instead. Events are streamed into two arrays per tag, never held as Python objects.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pandas as pd

from energydiag.errors import DiagError, first_line
from energydiag.io.scalars import Points, add_point, later_wins, scalar_frame

PATTERN = "events.out.tfevents*"


def event_files(folder: Path) -> list[Path]:
    """Every event file under ``folder``, oldest first within each sub-folder."""
    return sorted(p for p in folder.rglob(PATTERN) if p.is_file())


def read_scalars(files: list[Path], root: Path) -> pd.DataFrame:
    if not all(importlib.util.find_spec(name) for name in ("tensorboard", "pyarrow")):
        raise DiagError(
            root, "reading TensorBoard files needs: pip install 'energydiag[tensorboard]'"
        )
    parts: dict[str, list[Points]] = {}
    for path in files:
        prefix = path.parent.relative_to(root).as_posix() if path.parent != root else ""
        for tag, points in _scalars(path).items():
            parts.setdefault(f"{prefix}/{tag}" if prefix else tag, []).append(points)
    if not parts:
        raise DiagError(root, "holds no scalar summaries")
    return scalar_frame({tag: later_wins(found) for tag, found in parts.items()})


def _scalars(path: Path) -> dict[str, Points]:
    """One pass over the file's events, each scalar appended to its tag's two arrays: a long
    log is never held as Python objects. A legacy simple value is a scalar; a v2 tensor is one
    when its tag's plugin (named on the tag's first event only) is 'scalars'."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    found: dict[str, Points] = {}
    plugins: dict[str, str] = {}
    events = 0
    try:
        for event in LegacyEventFileLoader(str(path)).Load():
            events += 1
            for value in event.summary.value:
                scalar = _scalar(value, plugins)
                if scalar is not None:
                    add_point(found, value.tag, event.step, scalar)
    except Exception as err:  # TensorBoard raises its own data-loss and protobuf errors
        raise DiagError(
            path, f"not a readable TensorBoard event file ({first_line(err)})"
        ) from None
    if not events:
        raise DiagError(path, "not a readable TensorBoard event file (no event could be read)")
    return found


def _scalar(value: Any, plugins: dict[str, str]) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return value.simple_value
    plugin = value.metadata.plugin_data.plugin_name
    plugin = plugins.setdefault(value.tag, plugin) if plugin else plugins.get(value.tag)
    return _tensor_value(value.tensor) if kind == "tensor" and plugin == "scalars" else None


def _tensor_value(proto: Any) -> float:
    from tensorboard.util.tensor_util import make_ndarray

    value = make_ndarray(proto)
    if value.size != 1:
        raise ValueError(f"a scalar summary holds {value.size} values")
    return float(value.reshape(()))

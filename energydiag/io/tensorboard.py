"""TensorBoard scalars from every event file under a folder, merged by step.

A training job leaves several event files: one per restart in the same folder, one per
sub-folder for ``add_scalars`` or a validation writer. Each file is read alone (so an error
names it), tags from a sub-folder are prefixed with its path (``val/loss``), and when two files
of one folder log a tag at the same step the later file wins, as TensorBoard shows it after a
restart. Scalars come from legacy simple values and from v2 tensor summaries
(``tf.summary.scalar``, ``add_scalar(new_style=True)``), which store a 0-d tensor instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pandas as pd

from energydiag.errors import DiagError, first_line
from energydiag.io.scalars import marked

PATTERN = "events.out.tfevents*"


def event_files(folder: Path) -> list[Path]:
    """Every event file under ``folder``, oldest first within each sub-folder."""
    return sorted(p for p in folder.rglob(PATTERN) if p.is_file())


def read_scalars(files: list[Path], root: Path) -> pd.DataFrame:
    if importlib.util.find_spec("tensorboard") is None:
        raise DiagError(
            root, "reading TensorBoard files needs: pip install 'energydiag[tensorboard]'"
        )
    series: dict[str, dict[int, Any]] = {}
    for path in files:
        prefix = path.parent.relative_to(root).as_posix() if path.parent != root else ""
        for tag, points in _scalars(path).items():
            series.setdefault(f"{prefix}/{tag}" if prefix else tag, {}).update(points)
    if not series:
        raise DiagError(root, "holds no scalar summaries")
    frame = pd.DataFrame({tag: pd.Series(points, dtype=object) for tag, points in series.items()})
    return frame.rename_axis("step").reset_index()


def _scalars(path: Path) -> dict[str, dict[int, Any]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        acc.FirstEventTimestamp()  # raises when no event could be read: garbage, not a log
        tags = acc.Tags()
        found = {t: {e.step: marked(e.value) for e in acc.Scalars(t)} for t in tags["scalars"]}
        for tag in tags["tensors"]:
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
                found[tag] = {
                    e.step: marked(_tensor_value(e.tensor_proto)) for e in acc.Tensors(tag)
                }
    except Exception as err:  # TensorBoard raises its own data-loss and protobuf errors
        raise DiagError(
            path, f"not a readable TensorBoard event file ({first_line(err)})"
        ) from None
    return found


def _tensor_value(proto: Any) -> float:
    from tensorboard.util.tensor_util import make_ndarray

    value = make_ndarray(proto)
    if value.size != 1:
        raise ValueError(f"a scalar summary holds {value.size} values")
    return float(value.reshape(()))

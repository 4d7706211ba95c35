"""Reading metric logs into one shape: a DataFrame with an integer 'step' column and scalars.

Accepts metrics.jsonl (ours), CSV (including a Weights & Biases panel export, whose columns look
like 'VLA Train/Energy Loss' with '__MIN'/'__MAX' companions), a run directory, and TensorBoard
event files when the optional 'tensorboard' extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from energydiag.errors import DiagError, first_line
from energydiag.io.layout import METRICS

STEP_COLUMNS = ("step", "Step", "_step", "global_step", "trainer/global_step")
_COMPANIONS = ("__MIN", "__MAX")


def load_metrics(path: Path) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        events = sorted(path.glob("events.out.tfevents*"))
        if (path / METRICS).is_file():
            return load_metrics(path / METRICS)
        if events:
            return _tensorboard(events[0])
        raise DiagError(path, f"no {METRICS} or TensorBoard event file in this folder")
    if not path.is_file():
        raise DiagError(path, "file not found")
    if "tfevents" in path.name:
        return _tensorboard(path)
    frame = _jsonl(path) if path.suffix in (".jsonl", ".json") else _csv(path)
    return _with_step(frame, path)


def _jsonl(path: Path) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DiagError(path, f"not UTF-8 text (byte {err.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append({str(k): _marked(v) for k, v in json.loads(line).items()})
            except (ValueError, RecursionError, AttributeError):
                raise DiagError(path, f"line {n} is not a JSON object") from None
    return pd.DataFrame(rows)


def _marked(value: object) -> object:
    """A logged non-finite float becomes text, so it stays apart from a missing value (NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _csv(path: Path) -> pd.DataFrame:
    try:
        # Empty cells (metric not logged at that step) become NaN; a logged "NaN" stays text.
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as err:
        raise DiagError(path, f"not a readable CSV ({first_line(err)})") from None
    return frame[[c for c in frame.columns if not str(c).endswith(_COMPANIONS)]]


def _with_step(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    column = next((c for c in STEP_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DiagError(path, f"no step column (looked for {', '.join(STEP_COLUMNS)})")
    frame = frame.rename(columns={column: "step"})
    steps = pd.to_numeric(frame["step"].astype(str).str.strip(), errors="coerce")
    frame = frame[steps.notna()]
    steps = steps[steps.notna()].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(steps) | (steps != np.floor(steps)) | (steps < 0) | (steps >= 2.0**62)
    if bad.any():
        raise DiagError(path, f"step {steps[bad][0]!r} is not a whole number of steps")
    if frame.empty:
        raise DiagError(path, "holds no rows with a step")
    frame = frame.assign(step=steps.astype(np.int64)).sort_values("step", kind="stable")
    return frame.reset_index(drop=True)


def _tensorboard(path: Path) -> pd.DataFrame:
    if importlib.util.find_spec("tensorboard") is None:
        raise DiagError(
            path, "reading TensorBoard files needs: pip install 'energydiag[tensorboard]'"
        )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not path.is_file():
        raise DiagError(path, "is not a TensorBoard event file")
    try:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        series = {
            tag: pd.Series({e.step: _marked(e.value) for e in acc.Scalars(tag)}, dtype=object)
            for tag in acc.Tags()["scalars"]
        }
    except Exception as err:  # TensorBoard raises its own data-loss and protobuf errors
        raise DiagError(
            path, f"not a readable TensorBoard event file ({first_line(err)})"
        ) from None
    if not series:
        raise DiagError(path, "holds no scalar summaries")
    return pd.DataFrame(series).rename_axis("step").reset_index()


def metric_series(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, without the steps where it was not logged.

    Missing cells are NaN; values logged as non-finite are text ("NaN", "Infinity") and are kept.
    """
    column = frame[metric]
    present = column.notna().to_numpy()
    kept = column[present]
    if not pd.api.types.is_numeric_dtype(kept):
        kept = kept.astype(str).str.strip()
    values = pd.to_numeric(kept, errors="coerce").to_numpy(dtype=np.float64)
    return frame["step"].to_numpy(dtype=np.int64)[present], values


def choose_metric(frame: pd.DataFrame, wanted: str | None, source: Path | str) -> str:
    """An exact column name, else the one column containing ``wanted`` (case-insensitive).

    With nothing asked for: an energy loss if there is one, else 'loss'.
    """
    columns = [str(c) for c in frame.columns if c != "step"]
    for candidate in [wanted] if wanted else ["energy loss", "energy_loss", "loss"]:
        if candidate in columns:
            return candidate
        hits = [c for c in columns if candidate.lower() in c.lower()]
        if len(hits) == 1 or (hits and not wanted):
            return hits[0]
        if len(hits) > 1:
            raise DiagError(
                source, f"--metric {wanted!r} matches several columns: {', '.join(hits)}"
            )
    raise DiagError(
        source, f"no metric column matching {wanted or 'loss'!r} (have: {', '.join(columns)})"
    )

"""Reading metric logs into one shape: a DataFrame with an integer 'step' column and scalars.

Accepts metrics.jsonl (ours), CSV (including a Weights & Biases panel export, whose columns look
like 'VLA Train/Energy Loss' with '__MIN'/'__MAX' companions), JSON or parquet history exports,
a run directory, a local W&B run (with the 'wandb' extra) and TensorBoard event files (with the
'tensorboard' extra).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from energydiag.errors import DiagError, OptionError, first_line
from energydiag.io.layout import METRICS
from energydiag.io.scalars import marked
from energydiag.io.tensorboard import event_files, read_scalars
from energydiag.io.wandb_history import find_history, read_history

if TYPE_CHECKING:
    import pyarrow as pa

STEP_COLUMNS = ("step", "Step", "_step", "global_step", "trainer/global_step")
_COMPANIONS = ("__MIN", "__MAX")


def load_metrics(path: Path) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise DiagError(path, "file not found")
    if "tfevents" in path.name:
        return read_scalars([path], path.parent)
    if path.suffix == ".wandb":
        return _with_step(read_history(path), path)
    if path.suffix == ".parquet":
        return _with_step(_parquet(path), path)
    frame = _json(path) if path.suffix in (".jsonl", ".json") else _csv(path)
    return _with_step(frame, path)


def _folder(path: Path) -> pd.DataFrame:
    """Ours first, then a W&B run (its .wandb file, or an older wandb-history.jsonl), then
    every TensorBoard event file below."""
    if (path / METRICS).is_file():
        return load_metrics(path / METRICS)
    history = find_history(path)
    if history is not None:
        return load_metrics(history)
    if (path / "files" / "wandb-history.jsonl").is_file():
        return load_metrics(path / "files" / "wandb-history.jsonl")
    events = event_files(path)
    if events:
        return read_scalars(events, path)
    raise DiagError(path, f"no {METRICS}, W&B run or TensorBoard event file in this folder")


def _json(path: Path) -> pd.DataFrame:
    """JSON lines, or one JSON array of row objects (a W&B history export)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DiagError(path, f"not UTF-8 text (byte {err.start})") from None
    if text.lstrip().startswith("["):
        try:
            return pd.DataFrame([_row(row) for row in json.loads(text)])
        except (ValueError, RecursionError, AttributeError):
            raise DiagError(path, "not a JSON array of row objects") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(_row(json.loads(line)))
            except (ValueError, RecursionError, AttributeError):
                raise DiagError(path, f"line {n} is not a JSON object") from None
    return pd.DataFrame(rows)


def _row(obj: dict) -> dict[str, object]:
    return {str(k): marked(v) for k, v in obj.items()}


def _parquet(path: Path) -> pd.DataFrame:
    """Read through pyarrow's own lists: pandas would turn a missing value (null) into the same
    NaN as a logged NaN."""
    if importlib.util.find_spec("pyarrow") is None:
        raise DiagError(path, "reading parquet needs: pip install 'energydiag[parquet]'")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid and OSError kinds
        raise DiagError(path, f"not a readable parquet file ({first_line(err)})") from None
    columns = {
        name: [marked(v) for v in table.column(name).to_pylist()]  # None stays None
        for name in table.column_names
    }
    return pd.DataFrame(columns, dtype=object)


def _csv(path: Path) -> pd.DataFrame:
    """Empty cells (a metric not logged at that step) are missing; a logged "NaN" is kept. With
    pyarrow, its streaming reader (a long log's text is never held whole); without it, pandas'
    reader, where a logged "NaN" stays text."""
    if importlib.util.find_spec("pyarrow") is None:
        return _pandas_csv(path, {})
    import pyarrow as pa

    try:
        frame = _streamed_csv(path)
    except (pa.ArrowException, OSError, ValueError):  # a type guessed wrong; bad text, bad bytes
        frame = _pandas_csv(path, {"engine": "pyarrow", "dtype_backend": "pyarrow"})
    pa.default_memory_pool().release_unused()
    return frame[[c for c in frame.columns if not str(c).endswith(_COMPANIONS)]]


def _pandas_csv(path: Path, options: dict[str, str]) -> pd.DataFrame:
    """The reader that sees the whole file before it settles a column's type: a column empty
    for the first block of rows, or whole numbers that later turn fractional, still read."""
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], **options)
    except Exception as err:  # pandas' parser errors, and pyarrow's own ArrowInvalid
        raise DiagError(path, f"not a readable CSV ({first_line(err)})") from None


def _streamed_csv(path: Path) -> pd.DataFrame:
    """Blocks of 4 MiB, typed from the first one (an error on a later block that does not fit
    sends the file to the whole-file reader), then one column at a time into its frame."""
    import pyarrow as pa
    import pyarrow.csv as csv

    convert = csv.ConvertOptions(null_values=[""], strings_can_be_null=True)
    table = csv.open_csv(
        path, read_options=csv.ReadOptions(block_size=4 << 20), convert_options=convert
    ).read_all()
    pa.default_memory_pool().release_unused()  # the parser's buffers, before the copies
    columns = {}
    for name in table.column_names:
        column, table = table.column(name), table.drop_columns([name])
        columns[name] = _column(column)
    return pd.DataFrame(columns, copy=False)


def _column(column: pa.ChunkedArray) -> np.ndarray | pd.Series:
    """A numeric column with neither a missing cell nor a logged NaN becomes a plain array
    (half the memory of Arrow chunks plus a later copy); any other stays Arrow-backed, which
    keeps null (not logged) apart from NaN (logged non-finite)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    plain = (pa.types.is_integer(kind) or pa.types.is_floating(kind)) and not column.null_count
    if plain and pa.types.is_floating(kind):
        plain = not pc.any(pc.is_nan(column)).as_py()
    if plain:
        return column.to_numpy()
    return pd.Series(column, dtype=pd.ArrowDtype(kind))


def _with_step(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    column = next((c for c in STEP_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DiagError(path, f"no step column (looked for {', '.join(STEP_COLUMNS)})")
    frame = frame.rename(columns={column: "step"})
    steps = frame["step"]
    if not pd.api.types.is_numeric_dtype(steps):  # text: "12", " 12 ", "12.0"
        steps = pd.to_numeric(steps.astype(str).str.strip(), errors="coerce")
    present = steps.notna().to_numpy(dtype=bool)
    if not present.all():
        frame, steps = frame[present], steps[present]
    if frame.empty:
        raise DiagError(path, "holds no rows with a step")
    whole = _whole_steps(steps, path)
    if steps.dtype != whole.dtype:  # an int64 array already is its own steps: no frame copy
        frame = frame.assign(step=whole)
    if not frame["step"].is_monotonic_increasing:
        frame = frame.sort_values("step", kind="stable")
    return frame.reset_index(drop=True)


def _whole_steps(steps: pd.Series, path: Path) -> np.ndarray:
    """Steps as int64; a negative, fractional, non-finite or huge one is an error. Integer
    columns (a long log's usual case) are checked without a float copy."""
    if pd.api.types.is_integer_dtype(steps):
        whole = steps.to_numpy(dtype=np.int64)
        if (whole < 0).any() or (whole >= 2**62).any():
            bad = whole[(whole < 0) | (whole >= 2**62)][0]
            raise DiagError(path, f"step {float(bad)!r} is not a whole number of steps")
        return whole
    values = steps.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values >= 2.0**62)
    if bad.any():
        raise DiagError(path, f"step {values[bad][0]!r} is not a whole number of steps")
    return values.astype(np.int64)


def metric_series(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, without the steps where it was not logged.

    Missing cells are NaN; values logged as non-finite are text ("NaN", "Infinity") and are kept.
    """
    column = frame[metric]
    present = column.notna().to_numpy(dtype=bool)
    everywhere = bool(present.all())  # a long log's usual case: no copy to select
    kept = column if everywhere else column[present]
    if not pd.api.types.is_numeric_dtype(kept):
        kept = pd.to_numeric(kept.astype(str).str.strip(), errors="coerce")
    values = kept.to_numpy(dtype=np.float64, na_value=np.nan)
    steps = frame["step"].to_numpy(dtype=np.int64)
    return (steps if everywhere else steps[present]), values


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
            raise OptionError(
                f"matches several columns: {', '.join(hits)}",
                "metric",
                value=repr(wanted),
                path=source,
            )
    raise DiagError(
        source, f"no metric column matching {wanted or 'loss'!r} (have: {', '.join(columns)})"
    )

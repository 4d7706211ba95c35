"""Writing per-step tables: CSV always, Parquet when pyarrow is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from energydiag.errors import DiagError


def write_table(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise DiagError(
                path, "writing Parquet needs pyarrow (pip install 'energydiag[parquet]'); use .csv"
            )
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise DiagError(path, "unknown table format: use .csv or .parquet")

"""Writing per-step tables: CSV always, Parquet when pyarrow is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from energydiag.errors import DiagError
from energydiag.io.atomic import check_writable, replacing


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per dict, into a temporary sibling renamed on success: an interrupted write
    leaves nothing."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    check_writable(path)
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise DiagError(
            path, "writing Parquet needs pyarrow (pip install 'energydiag[parquet]'); use .csv"
        )
    if path.suffix not in (".csv", ".parquet"):
        raise DiagError(path, "unknown table format: use .csv or .parquet")
    with replacing(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)

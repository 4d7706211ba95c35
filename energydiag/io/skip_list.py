"""``skip_batches.json``: the steps whose update the run skipped (``on_alarm="skip"``), in the
convention of Lightning's SpikeDetection (``steps`` and ``batch_indices``)."""

from __future__ import annotations

import json
from pathlib import Path

from energydiag.errors import DiagError


def read_skip_list(path: Path) -> frozenset[int]:
    """The skipped steps; empty when the run skipped none."""
    if not path.is_file():
        return frozenset()
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiagError(path, f"not valid JSON ({err})") from None
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps
    ):
        raise DiagError(path, "'steps' must be a list of step numbers")
    return frozenset(steps)

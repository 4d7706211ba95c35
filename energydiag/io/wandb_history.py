"""A Weights & Biases run's history from its local files, without the network.

``wandb`` writes every record of a run into ``run-<id>.wandb``: a log of 32 KiB blocks, each
record framed by a CRC-32, a length and a FULL/FIRST/MIDDLE/LAST type (the LevelDB log format
behind a 7-byte ``:W&B`` header). The framing is read here; the records are W&B's protobuf
messages, decoded with the installed ``wandb`` package (``energydiag[wandb]``). Only history
rows are kept: one per logged step, with its scalar values. A run killed mid-write ends in a
partial record, which is dropped; a checksum mismatch before the end is an error.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from energydiag.errors import DiagError
from energydiag.io.scalars import Points, add_point, later_wins, scalar_frame

MAGIC = struct.Struct("<4sHB")
FRAME = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_history(folder: Path) -> Path | None:
    """The ``.wandb`` file of a run folder, or of ``wandb/latest-run`` in a wandb folder."""
    if (folder / "latest-run").is_dir():
        folder = folder / "latest-run"
    found = sorted(folder.glob("run-*.wandb"))
    if len(found) > 1:
        raise DiagError(folder, f"holds {len(found)} .wandb files: name one")
    return found[0] if found else None


def read_history(path: Path) -> pd.DataFrame:
    """The history: a 'step' column and one per scalar logged, streamed record by record into
    two arrays per metric (a long run is never held as Python rows)."""
    if not all(importlib.util.find_spec(name) for name in ("wandb", "pyarrow")):
        raise DiagError(path, "reading a W&B run needs: pip install 'energydiag[wandb]'")
    from wandb.proto import wandb_internal_pb2

    series: dict[str, Points] = {}
    with path.open("rb") as f:
        for payload in _records(f, path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except Exception:  # protobuf's DecodeError, and worse on garbage
                raise DiagError(path, "holds a record that is not a W&B message") from None
            if record.WhichOneof("record_type") == "history":
                _append(series, record.history)
    if not series:
        raise DiagError(path, "holds no history rows")
    return scalar_frame({key: later_wins([points]) for key, points in series.items()})


def _records(f: BinaryIO, path: Path) -> Iterator[bytes]:
    ident, magic, version = MAGIC.unpack(f.read(MAGIC.size).ljust(MAGIC.size, b"\0"))
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise DiagError(path, "is not a W&B run file (no ':W&B' header)")
    pos, pending = MAGIC.size, b""
    while True:
        left = BLOCK - pos % BLOCK
        if left < FRAME.size:  # no room for a frame: the writer padded to the next block
            if len(f.read(left)) < left:
                return
            pos += left
            continue
        head = f.read(FRAME.size)
        if len(head) < FRAME.size:
            return  # the end, or a frame cut short by a crash
        crc, length, kind = FRAME.unpack(head)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            f.read(left - FRAME.size)
            pos += left
            continue
        payload = f.read(length)
        if len(payload) < length:
            return  # the last record, cut short
        if length + FRAME.size > left or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise DiagError(path, f"corrupt record at byte {pos} (checksum or length)")
        pos += FRAME.size + length
        if kind == FULL:
            yield payload
        elif kind in (FIRST, MIDDLE):
            pending = (b"" if kind == FIRST else pending) + payload
        elif kind == LAST:
            yield pending + payload
        else:
            raise DiagError(path, f"corrupt record at byte {pos}: type {kind}")


def _append(series: dict[str, Points], history: Any) -> None:
    """One history row's scalars onto their metrics' arrays; a row without a step is skipped."""
    row: dict[str, float] = {}
    for item in history.item:
        value = _value(item)
        if value is not None:
            row[item.key or "/".join(item.nested_key)] = value
    step = history.step.num if history.HasField("step") else row.get("_step")
    if step is None:
        return
    for key, value in row.items():
        if not key.startswith("_"):
            add_point(series, key, int(step), value)


def _value(item: Any) -> float | None:
    """A scalar, non-finite ones included; media, tables and text are skipped."""
    kind = item.WhichOneof("value")
    if kind in ("number", "integer", "boolean"):
        value: Any = getattr(item, kind)
    else:
        try:
            value = json.loads(item.value_json)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)

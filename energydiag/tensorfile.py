"""Reading and writing safetensors files without surprises.

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written checkpoint behind. Reads turn every low-level failure (truncation, a bad
header, a missing file) into a one-line DiagError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from energydiag.errors import DiagError
from energydiag.layout import FORMAT


def write_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": FORMAT, **metadata})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def open_tensors(path: Path) -> Iterator[object]:
    """A safetensors handle whose tensors are read one at a time (never the whole file)."""
    if not path.is_file():
        raise DiagError(path, "file not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises several private error types
        raise DiagError(path, f"not a readable safetensors file ({_first_line(err)})") from None
    yield handle


class TensorReader:
    """Random access to a safetensors file, one tensor in memory at a time."""

    def __init__(self, path: Path, handle: object) -> None:
        self.path, self._handle = path, handle
        self.metadata: dict[str, str] = dict(handle.metadata() or {})
        self.names: list[str] = list(handle.keys())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as err:
            raise DiagError(
                self.path, f"truncated or corrupt tensor '{name}' ({_first_line(err)})"
            ) from None


@contextlib.contextmanager
def reader(path: Path) -> Iterator[TensorReader]:
    with open_tensors(path) as handle:
        yield TensorReader(path, handle)


def read_metadata(path: Path) -> dict[str, str]:
    with open_tensors(path) as f:
        return dict(f.metadata() or {})


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_tensors(path) as f:
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise DiagError(
                path, f"truncated or corrupt tensor data ({_first_line(err)})"
            ) from None
        return tensors, dict(f.metadata() or {})


def check_format(path: Path, metadata: Mapping[str, str], kind: str) -> None:
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise DiagError(path, f"unknown format version {fmt!r} (expected {FORMAT!r})")
    if metadata.get("kind") != kind:
        raise DiagError(path, f"is a {metadata.get('kind')!r} file, expected {kind!r}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

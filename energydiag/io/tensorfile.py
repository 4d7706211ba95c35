"""Reading and writing safetensors files without surprises.

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written checkpoint behind. Reads turn every low-level failure (truncation, a bad
header, a missing file) into a one-line DiagError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from energydiag.errors import DiagError
from energydiag.io.atomic import replacing
from energydiag.io.layout import FORMAT


def write_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with replacing(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": FORMAT, **metadata})


@contextlib.contextmanager
def open_tensors(path: Path) -> Iterator[object]:
    """A safetensors handle whose tensors are read one at a time (never the whole file)."""
    if not path.is_file():
        raise DiagError(path, "file not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises several private error types
        raise DiagError(path, _header_problem(_first_line(err))) from None
    yield handle


def _header_problem(message: str) -> str:
    """safetensors' words, with the common case said plainly."""
    detail = message.removeprefix("Error while deserializing header: ")
    if "not fully covered" in detail or "incomplete" in detail.lower():
        return f"truncated: the data ends before its header says ({detail})"
    return f"not a readable safetensors file ({detail})"


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader:
    """One tensor at a time, read with plain file reads into a buffer of exactly its size.

    Unlike a memory map, nothing but the tensor being looked at counts toward the process's
    memory, so inspecting a checkpoint larger than RAM works. The format is an 8-byte header
    length, a JSON header, then raw little-endian data: nothing here can execute code.
    """

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path, self._file = path, file
        size = path.stat().st_size
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if length > size - 8:
            raise DiagError(
                path, "not a readable safetensors file (header length beyond the end of the file)"
            )
        try:
            header = json.loads(file.read(length))
        except (ValueError, RecursionError):  # JSON, UTF-8, huge integers, deep nesting
            raise DiagError(path, "not a readable safetensors file (corrupt header)") from None
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._base, self._entries = 8 + length, header
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise DiagError(
                    path, f"tensor '{name}' has unsupported dtype {entry.get('dtype')!r}"
                )
            if self._base + entry["data_offsets"][1] > size:
                raise DiagError(path, f"truncated: tensor '{name}' ends beyond the end of the file")
        self.names: list[str] = list(header)

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, stop = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        if stop == start:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(stop - start)
        self._file.seek(self._base + start)
        if self._file.readinto(buffer) != len(buffer):
            raise DiagError(self.path, f"truncated: tensor '{name}' is cut short")
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


@contextlib.contextmanager
def reader(path: Path) -> Iterator[TensorReader]:
    """The streaming reader, over a file whose header safetensors itself has validated first
    (offsets contiguous and inside the file, byte sizes matching shapes and dtypes, bounded
    nesting): nothing in a header is trusted before that, and no tensor data is read by it."""
    with open_tensors(path):
        pass
    with path.open("rb") as file:
        yield TensorReader(path, file)


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

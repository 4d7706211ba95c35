"""Which kind of tensor file a path is, decided once, by content, never by suffix.

A safetensors file starts with its header length as a little-endian u64 and then a JSON object,
so its first byte is whatever the low byte of that length is: 0x80 for one header length in 256.
Testing "first byte 0x80" for a legacy pickle therefore misreads safetensors files; the real
structure (length inside the file, then '{') is checked first, and a pickle needs its protocol
byte too. The answer is cached per (path, size, mtime), so a command that meets one path in
several places reads its first bytes once.
"""

from __future__ import annotations

import enum
import functools
import struct
from pathlib import Path

SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own cap on a header's size
PICKLE_PROTOCOLS = range(2, 6)  # torch.save's legacy format writes protocol 2
DCP_METADATA = ".metadata"  # what makes a folder a torch.distributed.checkpoint


class Format(enum.Enum):
    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"  # torch.save since torch 1.6
    TORCH_PICKLE = "torch-pickle"  # torch.save with _use_new_zipfile_serialization=False
    DCP = "dcp"  # a torch.distributed.checkpoint folder
    MISSING = "missing"
    UNKNOWN = "unknown"

    @property
    def is_torch_save(self) -> bool:
        return self in (Format.TORCH_ZIP, Format.TORCH_PICKLE)


def sniff(path: Path) -> Format:
    """The format of ``path`` (a file, or a DCP folder holding '.metadata')."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return Format.MISSING
    return _sniff(str(path), stat.st_size, stat.st_mtime_ns, path.is_dir())


@functools.lru_cache(maxsize=4096)
def _sniff(path: str, size: int, mtime_ns: int, is_dir: bool) -> Format:
    del mtime_ns  # part of the cache key only: a rewritten file is sniffed again
    if is_dir:
        return Format.DCP if (Path(path) / DCP_METADATA).is_file() else Format.UNKNOWN
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return Format.MISSING
    return classify(head, size)


def classify(head: bytes, size: int) -> Format:
    """The format from a file's first nine bytes and its size."""
    if _looks_like_safetensors(head, size):
        return Format.SAFETENSORS
    if head.startswith(b"PK\x03\x04"):
        return Format.TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return Format.TORCH_PICKLE
    return Format.UNKNOWN


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= min(size - 8, SAFETENSORS_HEADER_LIMIT) and head[8:9] == b"{"

"""torch.distributed.checkpoint (DCP) directories, read from disk by one process.

A DCP checkpoint is a folder: ``.metadata`` (which tensor has which chunks, in which shard file
at which byte range) and one ``__<rank>_<n>.distcp`` file per writer. Each tensor chunk in a shard
is a ``torch.save`` of that chunk, read here with ``weights_only=True``; a tensor is assembled from
its chunks one at a time, so memory holds one tensor, never the checkpoint.

``.metadata`` itself is a pickle. It is read by an unpickler that admits only DCP's metadata
classes, ``torch.Size``, dtypes and paths, so a planted pickle cannot run code. Non-tensor
entries (param groups, counters) are pickles too and are not read at all.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from energydiag.errors import DiagError, first_line
from energydiag.io.formats import DCP_METADATA as METADATA
from energydiag.io.layout import SIDECAR
from energydiag.io.state import MODEL_PREFIX, OPTIM_PREFIX

_DCP = "torch.distributed.checkpoint"
ALLOWED = {
    (f"{_DCP}.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
OPTIMIZER_STATE = ("optim.state.", "optimizer.state.")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in ALLOWED and not dtype:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


class DcpReader:
    """The TensorReader interface over a DCP folder: model tensors as 'model.<fqn>', optimizer
    state as 'optim.<param fqn>.<field>', like our own checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        meta = read_metadata(self.path)
        # DCP keys storage by (fqn, chunk offsets, index); the index is only a lookup hint.
        self._storage = {(k.fqn, tuple(k.offset or ())): v for k, v in meta.storage_data.items()}
        self._tensors = {
            _our_name(fqn): (fqn, entry)
            for fqn, entry in meta.state_dict_metadata.items()
            if hasattr(entry, "chunks")
        }
        self.names = list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        fqn, entry = self._tensors[name]
        self._check_backed(fqn, entry)
        whole = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for index, chunk in enumerate(entry.chunks):
            part = self._chunk(fqn, tuple(chunk.offsets), index)
            if tuple(part.shape) != tuple(chunk.sizes):
                raise DiagError(
                    self.path,
                    f"shard of {fqn!r} holds {list(part.shape)}, "
                    f"the metadata says {list(chunk.sizes)}",
                )
            region = whole
            for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                region = region.narrow(dim, start, size)
            region.copy_(part)
        return whole

    def _check_backed(self, fqn: str, entry: Any) -> None:
        """Allocate nothing the files cannot hold: the chunks must tile the tensor, and each
        chunk's bytes must exist in its shard (a corrupt size would otherwise ask for TiBs)."""
        itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
        counts = [math.prod(c.sizes) for c in entry.chunks]
        if sum(counts) != math.prod(entry.size):
            raise DiagError(self.path / METADATA, f"the chunks of {fqn!r} do not tile its shape")
        for chunk, count in zip(entry.chunks, counts, strict=True):
            info = self._info(fqn, tuple(chunk.offsets))
            shard = self.path / info.relative_path
            on_disk = shard.stat().st_size if shard.is_file() else 0
            if count * itemsize > info.length or info.offset + info.length > on_disk:
                what = "missing shard" if not shard.is_file() else "truncated shard"
                raise DiagError(
                    shard,
                    f"{what}: {fqn!r} needs {count * itemsize} bytes at "
                    f"{info.offset}, the file has {on_disk}",
                )

    def _info(self, fqn: str, offsets: tuple[int, ...]) -> Any:
        info = self._storage.get((fqn, offsets))
        if info is None:
            raise DiagError(self.path / METADATA, f"no storage entry for {fqn!r} at {offsets}")
        return info

    def _chunk(self, fqn: str, offsets: tuple[int, ...], index: int) -> torch.Tensor:
        info = self._info(fqn, offsets)
        shard = self.path / info.relative_path
        if shard.resolve().parent != self.path.resolve():
            raise DiagError(shard, "shard named by .metadata lies outside the checkpoint folder")
        if getattr(info, "transform_descriptors", None):
            raise DiagError(shard, f"shard is stored transformed ({info.transform_descriptors})")
        if not shard.is_file():
            raise DiagError(shard, f"missing shard (holds {fqn!r})")
        with shard.open("rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        if len(data) < info.length:
            raise DiagError(
                shard,
                f"truncated shard: {fqn!r} needs bytes {info.offset}–"
                f"{info.offset + info.length}, the file has {shard.stat().st_size}",
            )
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises several kinds on corrupt bytes
            raise DiagError(shard, f"corrupt chunk of {fqn!r} ({first_line(err)})") from None


def read_metadata(path: Path) -> Any:
    file = path / METADATA
    # From memory, so a corrupt length asks the buffer for bytes it lacks instead of the heap.
    data = io.BytesIO(file.read_bytes())
    try:
        meta = _MetadataUnpickler(data).load()
    except (Exception, MemoryError) as err:  # corrupt pickles fail in every way they can
        raise DiagError(file, f"not DCP metadata ({first_line(err)})") from None
    if not (
        isinstance(getattr(meta, "state_dict_metadata", None), dict)
        and isinstance(getattr(meta, "storage_data", None), dict)
    ):
        raise DiagError(file, "not DCP metadata (no state_dict_metadata)")
    for fqn, entry in meta.state_dict_metadata.items():
        if hasattr(entry, "chunks") and not _tensor_entry(entry):
            raise DiagError(file, f"malformed metadata for {fqn!r}")
    for key, info in meta.storage_data.items():
        if not _storage_entry(key, info):
            raise DiagError(file, f"malformed storage entry {key!r}")
    return meta


def _ints(values: Any) -> bool:
    return isinstance(values, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )


def _tensor_entry(entry: Any) -> bool:
    """Shape, dtype and chunks a reader can trust: every chunk inside the tensor."""
    size, chunks = getattr(entry, "size", None), getattr(entry, "chunks", None)
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    if not (_ints(size) and isinstance(dtype, torch.dtype) and isinstance(chunks, list)):
        return False
    return all(
        _ints(getattr(c, "offsets", None))
        and _ints(getattr(c, "sizes", None))
        and len(c.offsets) == len(c.sizes) == len(size)
        and all(o + n <= d for o, n, d in zip(c.offsets, c.sizes, size, strict=True))
        for c in chunks
    )


def _storage_entry(key: Any, info: Any) -> bool:
    return (
        isinstance(getattr(key, "fqn", None), str)
        and isinstance(getattr(info, "relative_path", None), str)
        and _ints([getattr(info, "offset", None), getattr(info, "length", None)])
    )


def _our_name(fqn: str) -> str:
    for prefix in OPTIMIZER_STATE:
        if fqn.startswith(prefix):
            return OPTIM_PREFIX + fqn[len(prefix) :]
    return fqn if fqn.startswith(MODEL_PREFIX) else MODEL_PREFIX + fqn


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor, whole and under our names, and the Recorder's metadata beside the shards."""
    reader = DcpReader(path)
    return {name: reader.get(name) for name in reader.names}, load_sidecar(path)


def load_sidecar(path: Path) -> dict[str, str]:
    """``energydiag.json`` in a DCP folder the Recorder wrote (format, kind, step, param
    groups), as string metadata like a safetensors header; empty for a foreign folder."""
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        return {}
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DiagError(sidecar, "not a JSON object") from None
    if not isinstance(raw, dict):
        raise DiagError(sidecar, "not a JSON object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}

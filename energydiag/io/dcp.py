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
import pickle
from pathlib import Path
from typing import Any

import torch

from energydiag.errors import DiagError, first_line
from energydiag.io.state import MODEL_PREFIX, OPTIM_PREFIX

METADATA = ".metadata"
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


def is_dcp(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA).is_file()


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

    def _chunk(self, fqn: str, offsets: tuple[int, ...], index: int) -> torch.Tensor:
        info = self._storage.get((fqn, offsets))
        if info is None:
            raise DiagError(self.path / METADATA, f"no storage entry for {fqn!r} chunk {index}")
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
    try:
        with file.open("rb") as handle:
            meta = _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DiagError(file, f"not DCP metadata ({first_line(err)})") from None
    if not (hasattr(meta, "state_dict_metadata") and hasattr(meta, "storage_data")):
        raise DiagError(file, "not DCP metadata (no state_dict_metadata)")
    return meta


def _our_name(fqn: str) -> str:
    for prefix in OPTIMIZER_STATE:
        if fqn.startswith(prefix):
            return OPTIM_PREFIX + fqn[len(prefix) :]
    return fqn if fqn.startswith(MODEL_PREFIX) else MODEL_PREFIX + fqn

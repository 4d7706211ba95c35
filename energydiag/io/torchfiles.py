"""Checkpoints and batches as users already have them: torch.save'd state dicts and file names
that carry the step, e.g. "run--20000_chkpt/energy_model--20000_checkpoint.pt".

Pickles are loaded only with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers; what it refuses is never executed.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from energydiag.errors import DiagError, OptionError, first_line
from energydiag.io.formats import Format, sniff
from energydiag.io.state import plain_key

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
MAX_WRAPPING = 8  # {'state_dict': {'model': ...}} is common; a dict containing itself is not


def load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a torch.save'd file, unwrapped: {'state_dict': ...},
    {'model': ..., 'optimizer': ..., 'scheduler': ...}, 'module.' and '_orig_mod.' prefixes."""
    model, _ = load_checkpoint_dicts(path)
    return model


def load_checkpoint_dicts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, optimizer state tensors named 'param<i>.<field>') of a torch.save'd file."""
    path = Path(path)
    if not path.is_file():
        raise DiagError(path, "file not found")
    outer = _weights_only_load(path)
    obj = _unwrap(path, outer)
    if not isinstance(obj, dict):
        raise DiagError(path, f"holds a {type(obj).__name__}, not a state dict")
    tensors = {plain_key(str(k)): v for k, v in obj.items() if _usable(path, k, v)}
    if not tensors:
        raise DiagError(path, "holds no tensors")
    return tensors, _optimizer_tensors(path, outer)


def _unwrap(path: Path, obj: object) -> object:
    seen: set[int] = set()
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in WRAPPER_KEYS):
        if id(obj) in seen or len(seen) >= MAX_WRAPPING:
            raise DiagError(path, "its state dict contains itself (or is nested too deeply)")
        seen.add(id(obj))
        obj = next(obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict))
    return obj


def _usable(path: Path, key: object, value: object) -> bool:
    """Dense tensors only; the kinds a state dict should not hold are refused by name."""
    if not isinstance(value, torch.Tensor):
        return False
    if value.is_meta or value.layout != torch.strided:
        kind = "meta" if value.is_meta else str(value.layout).replace("torch.", "")
        raise DiagError(path, f"tensor '{key}' is a {kind} tensor: only dense tensors are read")
    if value.dtype.is_floating_point and value.element_size() == 1:
        raise DiagError(path, f"tensor '{key}' has dtype {value.dtype}, which is not supported")
    claimed = value.numel() * value.element_size()
    if claimed > 2 * value.untyped_storage().nbytes() + 64:  # a stride-0 view of a small storage
        raise DiagError(
            path,
            f"tensor '{key}' claims {claimed} bytes over a {value.untyped_storage().nbytes()}-byte "
            "storage: refusing to materialise an expanded view",
        )
    return True


def _optimizer_tensors(path: Path, outer: object) -> dict[str, torch.Tensor]:
    """A trainer checkpoint's optimizer state, flattened by parameter index."""
    if not isinstance(outer, dict):
        return {}
    state = next((outer[k] for k in OPTIMIZER_KEYS if isinstance(outer.get(k), dict)), {})
    per_param = state.get("state", {}) if isinstance(state, dict) else {}
    return {
        f"param{index}.{field}": value
        for index, fields in per_param.items()
        if isinstance(fields, dict)
        for field, value in fields.items()
        if _usable(path, field, value) and value.dim() > 0
    }


def _weights_only_load(path: Path) -> object:
    with warnings.catch_warnings():  # torch warns about pickle protocols: noise for our users
        warnings.simplefilter("ignore", UserWarning)
        return _load(path)


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
            raise DiagError(path, f"not a readable torch checkpoint ({first_line(err)})") from None
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except Exception as err:  # torch.load's other failures: zip, storage and format errors
        raise DiagError(path, f"not a readable torch checkpoint ({first_line(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except Exception as err:
        raise DiagError(path, f"not a readable torch checkpoint ({first_line(err)})") from None


def _refused(path: Path, err: Exception) -> DiagError:
    """weights_only's refusal of an object it will not build, or a file that is no pickle."""
    if "Weights only load failed" not in str(err):
        return DiagError(path, f"not a readable torch checkpoint ({first_line(err)})")
    what = re.search(r"GLOBAL ([\w.]+)", str(err))
    found = f" (it references {what.group(1)})" if what else ""
    return DiagError(
        path,
        "refused: loading it would unpickle arbitrary Python objects"
        f"{found}; energydiag loads tensors only (torch.load weights_only=True)",
    )


class PickleReader:
    """The TensorReader interface over a torch.save'd checkpoint (memory-mapped when torch can);
    optimizer state, when the file holds it, appears as 'optim.param<i>.<field>'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        model, optim = load_checkpoint_dicts(path)
        self._tensors = model | {f"optim.{k}": v for k, v in optim.items()}
        self.metadata: dict[str, str] = {}
        self.names = list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@contextmanager
def open_reader(path: Path) -> Iterator[object]:
    """A reader for safetensors (streamed), torch.save files (weights-only), by content, or a
    torch.distributed.checkpoint folder (one tensor at a time)."""
    from energydiag.io.dcp import DcpReader
    from energydiag.io.tensorfile import reader

    kind = sniff(path)
    if kind is Format.DCP:
        yield DcpReader(path)
        return
    if kind.is_torch_save:
        yield PickleReader(path)
        return
    with reader(path) as r:
        yield r


def discover(root: Path, pattern: str) -> dict[int, Path]:
    """Files under ``root`` matching ``pattern``, whose '{step}' placeholder gives their step."""
    if pattern.count("{step}") != 1:
        raise OptionError(
            "the pattern needs exactly one {step} placeholder", "checkpoints", value=repr(pattern)
        )
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise OptionError(
            "give a pattern relative to the folder", "checkpoints", value=repr(pattern)
        )
    if "*{step}" in pattern or "{step}*" in pattern:
        raise OptionError(
            "a wildcard next to {step} makes the step ambiguous", "checkpoints", value=repr(pattern)
        )
    regex = re.compile(
        "^"
        + re.escape(pattern).replace(re.escape("{step}"), r"(\d+)").replace(r"\*", "[^/]*")
        + "$"
    )
    found: dict[int, Path] = {}
    for path in sorted(Path(root).glob(pattern.replace("{step}", "*"))):
        match = regex.match(path.relative_to(root).as_posix())
        if not match:
            continue
        step = int(match.group(1))
        if step in found:
            raise DiagError(path, f"step {step} is also {found[step]}: the pattern is ambiguous")
        found[step] = path
    if not found:
        raise DiagError(root, f"no files match {pattern!r}")
    return dict(sorted(found.items()))

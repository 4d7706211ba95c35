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

from energydiag.errors import DiagError
from energydiag.io.state import plain_key

PT_SUFFIXES = (".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def is_pickle(path: Path) -> bool:
    return Path(path).suffix in PT_SUFFIXES


def load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .pt/.pth state dict, unwrapped ({'state_dict': ...}, 'module.', '_orig_mod.')."""
    path = Path(path)
    if not path.is_file():
        raise DiagError(path, "file not found")
    obj = _weights_only_load(path)
    while (
        isinstance(obj, dict)
        and len(obj) >= 1
        and any(isinstance(obj.get(k), dict) for k in WRAPPER_KEYS)
    ):
        obj = next(obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict))
    if not isinstance(obj, dict):
        raise DiagError(path, f"holds a {type(obj).__name__}, not a state dict")
    tensors = {plain_key(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DiagError(path, "holds no tensors")
    return tensors


def _weights_only_load(path: Path) -> object:
    with warnings.catch_warnings():  # torch warns about pickle protocols: noise for our users
        warnings.simplefilter("ignore", UserWarning)
        return _load(path)


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
            raise DiagError(
                path, f"not a readable torch checkpoint ({str(err).splitlines()[0]})"
            ) from None
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except (EOFError, ValueError, OSError) as err:
        raise DiagError(path, f"not a readable torch checkpoint ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise DiagError(
            path, f"not a readable torch checkpoint ({str(err).splitlines()[0]})"
        ) from None


def _refused(path: Path, err: Exception) -> DiagError:
    what = re.search(r"GLOBAL ([\w.]+)", str(err))
    found = f" (it references {what.group(1)})" if what else ""
    return DiagError(
        path,
        "refused: loading it would unpickle arbitrary Python objects"
        f"{found}; energydiag loads tensors only (torch.load weights_only=True)",
    )


class PickleReader:
    """The TensorReader interface over a .pt state dict (memory-mapped when torch can)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors = load_tensor_dict(path)
        self.metadata: dict[str, str] = {}
        self.names = list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@contextmanager
def open_reader(path: Path) -> Iterator[object]:
    """A reader for .safetensors (streamed) or .pt/.pth (weights-only pickle)."""
    from energydiag.io.tensorfile import reader

    if is_pickle(path):
        yield PickleReader(path)
        return
    with reader(path) as r:
        yield r


def discover(root: Path, pattern: str) -> dict[int, Path]:
    """Files under ``root`` matching ``pattern``, whose '{step}' placeholder gives their step."""
    if pattern.count("{step}") != 1:
        raise DiagError(
            None, f"--checkpoints {pattern!r}: the pattern needs exactly one {{step}} placeholder"
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

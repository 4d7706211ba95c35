"""Writing files so that a failure never leaves half of one, and refusing targets early.

Standard library only: the CLI checks its output paths before loading torch or running a
replay, so a typo in --metrics-out is reported in a second, not after the work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from energydiag.errors import DiagError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling to write, renamed over ``path`` only when the block succeeds (with the
    permissions a plain ``open(path, "w")`` would give: mkstemp makes its files private); on any
    failure, nothing is left behind. Every file energydiag writes goes through here."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: Path) -> None:
    """A one-line error now, instead of a traceback after the work, for an unusable target."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DiagError(path, "is a directory; give a file name")
    if not parent.is_dir():
        raise DiagError(path, f"cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DiagError(path, f"cannot write: folder {parent} is not writable")

"""Import strings turned into objects: the manifest's, and the registries through which the
engine and the record layer reach higher layers. Without torch, so `curves` on a log file (the
live monitors' rules, offline) does not pay for it."""

from __future__ import annotations

import pkgutil
from typing import Any

from energydiag.errors import DiagError
from energydiag.io.manifest import import_string

# Built-in losses by import string: the engine never imports the reference package itself.
BUILTIN_LOSSES = {
    name: f"energydiag.reference.losses:{name}"
    for name in ("inbatch_infonce", "gathered_infonce", "infonce_negatives", "margin")
}

# What the live monitors know of energy models (record/live.py loads them): the contrastive layer's.
LIVE_ENERGY = {
    "quantities": "energydiag.contrastive.live:energy_quantities",
    "monitors": "energydiag.contrastive.alarms:energy_monitors",
}


# Runs recorded by the trainer callbacks before they moved name them where they were.
MOVED = {"energydiag.integrations.": "energydiag.record."}


def resolve(target: str, what: str) -> Any:
    """``package.module:attr`` imported; the module's package must be importable (installed, or
    on PYTHONPATH)."""
    if not import_string(target):
        raise DiagError(None, f"{what} {target!r} is not an import string 'package.module:name'")
    for old, new in MOVED.items():
        target = new + target.removeprefix(old) if target.startswith(old) else target
    try:
        return pkgutil.resolve_name(target)
    except (ImportError, AttributeError, ValueError) as err:
        hint = (
            " (is its package installed, or on PYTHONPATH?)" if isinstance(err, ImportError) else ""
        )
        raise DiagError(None, f"cannot import {what} {target!r}: {err}{hint}") from None

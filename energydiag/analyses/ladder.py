"""The precision ladder: re-run a failing step in the recorded precision, then float32, then
float64, and see where the fault disappears.

A fault that vanishes in float32 is a precision fault (a float16 overflow, an eps below the
dtype's resolution): keep that part in float32, or use bfloat16. One that survives float64 is
in the maths (a log of 0, a std over one element): no dtype will fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.engine.localise import localise
from energydiag.engine.replay import state_before
from energydiag.io.rundir import Run
from energydiag.schema import Record

RUNGS = (("float32", torch.float32), ("float64", torch.float64))
FAILS, FINITE, NOT_APPLICABLE = "fails", "finite", "not applicable"
# What torch says when the user's own code casts to another dtype than the one imposed.
_DTYPE_CLASH = ("dtype", "Double", "Float", "Half", "BFloat16")


@dataclass
class Ladder(Record):
    step: int
    rungs: list[dict[str, Any]]
    verdict: str  # "precision", "maths", "undecided" (float64 could not run) or "not reproduced"
    findings: list[rules.Finding] = field(default_factory=list)


def precision_ladder(run: Run, step: int, device: torch.device | None = None) -> Ladder:
    device = device or torch.device("cpu")
    recorded = run.manifest.autocast_dtype or "as recorded"
    rungs = [_rung(run, step, device, recorded, None)]
    rungs += [_rung(run, step, device, name, dtype) for name, dtype in RUNGS]
    applicable = [r for r in rungs if r["status"] != NOT_APPLICABLE]
    if rungs[0]["status"] != FAILS:
        verdict = "not reproduced"
    elif any(r["status"] == FINITE for r in applicable):
        verdict = "precision"
    elif rungs[-1]["status"] == NOT_APPLICABLE:  # "in the maths" needs float64 to have failed
        verdict = "undecided"
    else:
        verdict = "maths"
    ladder = Ladder(step, rungs, verdict)
    evidence = ladder.to_dict() | {"autocast_dtype": run.manifest.autocast_dtype}
    ladder.findings = rules.ranked([rules.precision_verdict(evidence)])
    return ladder


def _rung(run: Run, step: int, device, name: str, dtype: torch.dtype | None) -> dict[str, Any]:
    session = state_before(run, step, device)
    if dtype is not None:
        session.set_precision(dtype)
    fault = localise(session, run.batch(step))
    op = fault.op if fault else None
    status = FINITE if fault is None else FAILS
    if (
        dtype is not None
        and fault
        and fault.exception
        and any(w in fault.exception for w in _DTYPE_CLASH)
    ):
        status = NOT_APPLICABLE  # the model casts inside its forward: this rung cannot be run
    return {
        "precision": name,
        "status": status,
        "fault": fault.summary if fault else None,
        "phase": fault.phase if fault else None,
        "op": op.op if op else None,
        "module": fault.module if fault else None,
    }

"""Every rule in one namespace: ``from energydiag import findings as rules; rules.saturation(...)``.

Rules live in small modules by subject; each turns numbers an analysis computed into a Finding
with its evidence and remedy, or None. Adding a rule is adding a function to one of them.
"""

from energydiag.findings.base import SEVERITIES, Finding, has_code, has_error, ranked
from energydiag.findings.checkpoints import (
    adam_blowup_risk,
    beyond_autocast_range,
    checkpoint_exploded,
    grown_since_first,
    non_monotone,
    nonfinite_tensors,
    norm_outliers,
    timeline_exploded,
    unresolved_interval,
    weights_broke_between,
)
from energydiag.findings.contrastive import (
    all_masked_rows,
    bounded_head_floor,
    coarse_inputs,
    contrastive_health,
    dead_gradients,
    loss_position,
    model_raised,
    narrow_energy_range,
    saturation,
    stuck_between_floor_and_chance,
    unreachable_margin,
)
from energydiag.findings.curves import (
    curve_constant,
    curve_divergence,
    curve_nonfinite,
    curve_oscillation,
    curve_plateau,
    curve_spikes,
    curve_unstable,
    whatif_failures,
    whatif_ranking,
)
from energydiag.findings.faults import (
    explain_fault,
    root_cause,
)
from energydiag.findings.replay import (
    cannot_replay,
    fidelity,
    no_batches,
    precision_verdict,
    schedule_jumps,
    skipped_steps,
    unseen_event,
)

__all__ = [
    "curve_unstable",
    "weights_broke_between",
    "SEVERITIES",
    "Finding",
    "has_code",
    "has_error",
    "ranked",
    "narrow_energy_range",
    "loss_position",
    "bounded_head_floor",
    "saturation",
    "all_masked_rows",
    "contrastive_health",
    "stuck_between_floor_and_chance",
    "dead_gradients",
    "unreachable_margin",
    "coarse_inputs",
    "model_raised",
    "explain_fault",
    "root_cause",
    "fidelity",
    "unseen_event",
    "schedule_jumps",
    "skipped_steps",
    "precision_verdict",
    "cannot_replay",
    "no_batches",
    "nonfinite_tensors",
    "norm_outliers",
    "adam_blowup_risk",
    "beyond_autocast_range",
    "checkpoint_exploded",
    "grown_since_first",
    "timeline_exploded",
    "unresolved_interval",
    "non_monotone",
    "curve_nonfinite",
    "curve_plateau",
    "curve_constant",
    "curve_divergence",
    "curve_spikes",
    "curve_oscillation",
    "whatif_ranking",
    "whatif_failures",
]

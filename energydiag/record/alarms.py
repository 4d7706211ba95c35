"""What the Recorder does when a live monitor fires (``on_alarm``): say it, keep evidence, skip.

Every alarm is one line through ``logging`` (logger ``energydiag.alarms``), one line of
``RUN/alerts.jsonl``, a W&B alert when a W&B run is active, and whatever the trainer callbacks
add to ``listeners`` (their trainer's own logger). ``dump`` also writes the ring and a pre-step
checkpoint, so ``replay`` can start exactly there; ``skip`` drops this step's gradients
(``optimizer.step()`` then leaves every parameter as it was) and lists the step in
``RUN/skip_batches.json``, which replay and what-if honour; ``raise`` raises ``Alarmed``; a
callable gets the alarms.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from energydiag.io.atomic import write_text_atomic
from energydiag.io.layout import ALERTS, SKIP_BATCHES
from energydiag.record.monitors import Alarm, Monitor, default_monitors

ACTIONS = ("warn", "dump", "raise", "skip")
log = logging.getLogger("energydiag.alarms")
OnAlarm = str | Callable[[list[Alarm]], Any]


class Alarmed(RuntimeError):
    """Raised by ``on_alarm="raise"``: the run was about to go wrong, the alarm says why."""


class AlarmDesk:
    def __init__(
        self, root: Path, monitors: list[Monitor] | None, on_alarm: OnAlarm, lead: bool
    ) -> None:
        if not callable(on_alarm) and on_alarm not in ACTIONS:
            raise ValueError(f"on_alarm must be one of {', '.join(ACTIONS)} or a callable")
        self.root, self.on_alarm, self.lead = root, on_alarm, lead
        self.monitors = default_monitors() if monitors is None else list(monitors)
        self.skipped: list[int] = []
        self.listeners: list[Callable[[list[Alarm]], Any]] = [wandb_alert] if lead else []

    def check(self, step: int, row: dict[str, float]) -> list[Alarm]:
        """This rank's alarms for the step (every monitor sees every row, to keep its band)."""
        return [a for a in (m.observe(step, row) for m in self.monitors) if a is not None]

    def act(
        self,
        step: int,
        alarms: list[Alarm],
        ranks: list[int],
        model: nn.Module,
        dump: Callable[[str], dict[str, Any]],
    ) -> None:
        """Every rank acts when any rank alarmed (``ranks``); ``dump(reason)`` keeps evidence."""
        alarms = alarms or [Alarm(step, "other_rank", f"rank(s) {ranks} alarmed")]
        action = self.on_alarm if isinstance(self.on_alarm, str) else "callable"
        kept = dump(f"alarm: {alarms[0].rule}") if action == "dump" else None
        if action == "skip":
            for p in model.parameters():
                p.grad = None  # optimizer.step() skips a parameter without a gradient
            self.skipped.append(step)
        for alarm in alarms:
            log.warning("energydiag: step %d: %s (%s)", step, alarm.message, alarm.rule)
        if self.lead:
            self._write(alarms, ranks, action, kept)
        for listener in self.listeners:
            listener(alarms)
        if action == "raise":
            raise Alarmed(f"step {step}: {alarms[0].message}")
        if callable(self.on_alarm):
            self.on_alarm(alarms)

    def _write(self, alarms: list[Alarm], ranks: list[int], action: str, kept) -> None:
        with (self.root / ALERTS).open("a") as out:
            for alarm in alarms:
                line = alarm.to_dict() | {"action": action, "ranks": ranks}
                out.write(json.dumps(line | ({"dumped": kept} if kept else {})) + "\n")
        if action == "skip":
            text = json.dumps({"steps": self.skipped, "batch_indices": self.skipped}) + "\n"
            write_text_atomic(self.root / SKIP_BATCHES, text)


def wandb_alert(alarms: list[Alarm]) -> None:
    """A W&B alert per alarm when the process has an active W&B run (never imports wandb)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    for alarm in alarms if run is not None else []:
        run.alert(title=f"energydiag: {alarm.rule}", text=f"step {alarm.step}: {alarm.message}")

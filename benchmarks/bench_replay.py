"""Replay cost tiers, as ratios to a plain training step on the same model and batch.

    python benchmarks/bench_replay.py [--rounds N]

Targets (issue 4): cheap check <= 1.05x, fully instrumented <= 1.5x.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import interleaved_medians, record, report

from energydiag.contrastive.quantities import STANDARD
from energydiag.engine.localise import localise
from energydiag.engine.replay import run_step
from energydiag.engine.session import open_session
from energydiag.io.rundir import Run


def main(rounds: int, device: str) -> None:
    torch.set_num_threads(1)
    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(record(Path(tmp) / "run"))
        session = open_session(run, 0, target)
        batch = run.batch(0)
        clip = run.manifest.grad_clip

        model, optimizer = session.model, session.optimizer
        data = session.batch_on_device(batch)

        def plain() -> None:
            """What the user's loop does: plain PyTorch, no energydiag."""
            torch.set_rng_state(batch.rng["rng.cpu"])
            optimizer.zero_grad(set_to_none=True)
            loss, _ = session.loss_fn(model, data)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            sync()

        def anomaly() -> None:
            with torch.autograd.detect_anomaly(check_nan=True):
                plain()

        variants = {
            "plain training step": plain,
            "replay, cheap check": lambda: run_step(session, batch),
            "replay, statistics step (--every)": lambda: run_step(session, batch, STANDARD),
            "fully instrumented (deep re-run)": lambda: localise(session, batch),
            "torch detect_anomaly(check_nan)": anomaly,
        }
        for fn in variants.values():  # warm-up
            fn()
        medians = interleaved_medians({k: _synced(f, sync) for k, f in variants.items()}, rounds)
    report(
        f"replay tiers, median of {rounds} rounds (1 CPU thread, {target})",
        medians,
        "plain training step",
    )


def _synced(fn, sync):
    return lambda: (fn(), sync())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    main(args.rounds, args.device)

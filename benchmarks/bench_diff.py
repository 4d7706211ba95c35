"""What `diff`'s fingerprints cost: one fingerprinted replay step against the same step replayed
plainly, on the benchmark model (interleaved medians, one run).

    python benchmarks/bench_diff.py [--rounds N]

Goal (issue 23): ≤ 1.3× a plain step. Each op's outputs and float inputs are reduced to two
float64 numbers on the device, under the instrument's dispatch mode.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import interleaved_medians, record, report

from energydiag.engine.fingerprint import Fingerprints
from energydiag.engine.instrument import Instrument
from energydiag.engine.session import open_session
from energydiag.io.rundir import Run


class Idle:
    def on_op(self, call: object) -> None:
        """Sees every op, computes nothing."""


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(record(Path(tmp) / "run"))
        session = open_session(run, 0, torch.device("cpu"))
        batch = run.batch(0)
        counted: list[int] = []

        def plain() -> None:
            session.train(batch)

        def instrumented() -> None:
            """The dispatch mode and module tracker alone, with an observer that does nothing."""
            with Instrument([Idle()]).attached(session.optimizer):
                session.train(batch)

        def fingerprinted() -> None:
            prints = Fingerprints(session.model)
            with Instrument([prints]).attached(session.optimizer):
                session.train(batch)
            counted.append(len(prints.prints()))

        medians = interleaved_medians(
            {
                "replayed step": plain,
                "instrumented, idle observer": instrumented,
                "fingerprinted step": fingerprinted,
            },
            rounds,
        )
    report(f"diff fingerprints ({counted[-1]} ops a step, 1 thread, CPU)", medians, "replayed step")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    main(parser.parse_args().rounds)

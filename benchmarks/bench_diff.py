"""What `diff`'s fingerprints cost: each way of watching a replayed step against the same step
replayed plainly, on the benchmark model (interleaved medians, one run).

    python benchmarks/bench_diff.py [--rounds N] [--device cpu|cuda]

Goal (issue 23): ≤ 1.3× a plain step and ≤ 10% extra memory. `diff` watches every step by
module hooks (outputs, the loss, gradients, then the parameters and optimizer state the step
left: ``engine/module_prints.py``), with no dispatch mode; only the step where the sides part is
played once more with the ops of one phase fingerprinted under the instrument's dispatch mode
(each op's outputs and float inputs reduced to two float64 numbers on the device:
``engine/reductions.py``). Every op of a step is fingerprinted for ``--bitwise`` and for
``check --numerics-baseline``. Memory: in fresh processes (Linux), the peak RSS a step adds over
the session it starts from, plain, watched, with every op fingerprinted, and with --bitwise's
checksums.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import interleaved_medians, record, report

from energydiag.analyses.numerics_diff import NAMED_IN
from energydiag.engine.fingerprint import Fingerprints
from energydiag.engine.instrument import FORWARD, Instrument
from energydiag.engine.module_prints import ModulePrints
from energydiag.engine.session import Session, open_session
from energydiag.io.rundir import Batch, Run


class Idle:
    def on_op(self, call: object) -> None:
        """Sees every op, computes nothing."""


def step_peak_mib(run_dir: str, how: str) -> float:
    """In this process: the peak RSS three steps add over the opened session (VmHWM reset)."""
    torch.set_num_threads(1)
    run = Run(run_dir)
    session, batch = open_session(run, 0, torch.device("cpu")), run.batch(0)
    session.train(batch)  # the optimizer state and the allocator's pools exist before the reset
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        if how == "plain":
            session.train(batch)
        elif how == "watched":
            watch(session, batch)
        else:
            prints = Fingerprints(session.model, bitwise=how == "bitwise")
            with Instrument([prints]).attached(session.optimizer):
                session.train(batch)
            prints.prints()
    return _rss("VmHWM") - before


def watch(session: Session, batch: Batch) -> None:
    """What `diff` watches every step with: module outputs, the loss and gradients by hooks,
    no dispatch mode, then the parameters and optimizer state the step left."""
    prints = ModulePrints(session.model, compiled=False)
    try:
        loss = session.train(batch).loss
        prints.prints(float(loss), session.optimizer)
    finally:
        prints.detach()


def _rss(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def memory(run_dir: Path) -> None:
    """Under glibc's default allocator, and with its mmap threshold fixed: the default raises
    the threshold as large blocks are freed and then serves them from a heap it does not
    shrink, which the peak RSS counts as if it were live, so its numbers move from run to run."""
    here = Path(__file__).resolve().parent
    for label, env in (("default malloc", {}), ("MALLOC_MMAP_THRESHOLD_=131072", FIXED)):
        peaks = {}
        for how in ("plain", "watched", "fingerprinted", "bitwise"):
            code = f"import bench_diff; print(bench_diff.step_peak_mib({str(run_dir)!r}, {how!r}))"
            out = subprocess.run(
                [sys.executable, "-c", code],
                cwd=here,
                capture_output=True,
                text=True,
                check=True,
                env=os.environ | env,
            )
            peaks[how] = float(out.stdout.strip().splitlines()[-1])
        print(f"  peak RSS a step adds over its session (fresh processes, {label}):")
        for how, mib in peaks.items():
            print(f"    {how:<14} {mib:7.1f} MiB  (+{mib - peaks['plain']:.1f} MiB over plain)")


FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def main(rounds: int, device: str) -> None:
    """On CUDA each variant ends in a synchronize (the watch reads its numbers back at the end
    of the step, a plain step would not wait for its kernels), and memory is not measured: the
    RSS measures what lives on the CPU."""
    torch.set_num_threads(1)
    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(record(Path(tmp) / "run"))
        session = open_session(run, 0, target)
        batch = run.batch(0)
        counted: list[int] = []

        def plain() -> None:
            session.train(batch)

        def instrumented() -> None:
            """The dispatch mode and module tracker alone, with an observer that does nothing."""
            with Instrument([Idle()]).attached(session.optimizer):
                session.train(batch)

        def fingerprinted(phases: frozenset[str] | None = None) -> None:
            prints = Fingerprints(session.model, phases=phases)
            with Instrument([prints]).attached(session.optimizer):
                session.train(batch)
            counted.append(len(prints.prints()))

        variants = {
            "replayed step": plain,
            "instrumented, idle observer": instrumented,
            "watched by module (every step)": lambda: watch(session, batch),
            "forward ops fingerprinted": lambda: fingerprinted(NAMED_IN[FORWARD]),
            "every op fingerprinted": fingerprinted,
        }
        synced = {name: (lambda fn=fn: (fn(), sync())) for name, fn in variants.items()}
        medians = interleaved_medians(synced, rounds)
        title = f"diff fingerprints ({counted[-1]} ops a step, 1 thread, {target})"
        report(title, medians, "replayed step")
        if target.type == "cpu":
            memory(Path(tmp) / "run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    main(args.rounds, args.device)

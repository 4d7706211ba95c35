"""Streaming inspection of a >= 1 GB checkpoint against the plainest alternative: safetensors'
load_file, then max, norm and isfinite over every tensor (issue 12's baseline).

    python benchmarks/bench_inspect.py [--gib 1.0]

Goal: at most 1.0x the baseline's time at 0.4x its peak memory, with overflow-safe statistics
(the baseline's float32 norm is +Inf for finite weights near 1e20; inspect's is not). Each
approach runs in its own subprocess so its peak RSS (VmHWM, Linux) is its own; both include the
~300 MiB that importing torch costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from common import peak_rss_mib
import torch
from safetensors.torch import load_file
from energydiag.analyses.checkpoint_report import checkpoint_report
start = time.perf_counter()  # the work only: both sides have imported the same libraries
if sys.argv[1] == "inspect":
    report = checkpoint_report(Path(sys.argv[2]))
    n = len(report.tensors)
else:
    state = load_file(sys.argv[2])
    stats = [(t.max(), torch.linalg.vector_norm(t), torch.isfinite(t).all()) for t in state.values()]
    n = len(state)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": n, "peak_rss_mib": peak_rss_mib()}))
"""


def make_checkpoint(path: Path, gib: float, tensors: int = 16) -> int:
    per = int(gib * 2**30 / 4 / tensors)
    gen = torch.Generator().manual_seed(0)
    state = {f"model.block{i}.weight": torch.randn(per, generator=gen) for i in range(tensors)}
    save_file(
        state, str(path), metadata={"format": "energydiag/1", "kind": "checkpoint", "step": "0"}
    )
    return per * 4


def measure(mode: str, path: Path) -> dict:
    here = str(Path(__file__).resolve().parent)
    command = [sys.executable, "-c", CHILD, mode, str(path), here]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(gib: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        largest = make_checkpoint(path, gib)
        size = path.stat().st_size
        results = {mode: measure(mode, path) for mode in ("inspect", "load_file+max/norm/isfinite")}
    print(f"checkpoint {size / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB")
    for mode, r in results.items():
        print(f"  {mode:<28} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mib']:8.0f} MiB")
    streamed, whole = results["inspect"], results["load_file+max/norm/isfinite"]
    print(
        f"  inspect / baseline: time {streamed['seconds'] / whole['seconds']:.2f}x, "
        f"peak RSS {streamed['peak_rss_mib'] / whole['peak_rss_mib']:.2f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    main(parser.parse_args().gib)

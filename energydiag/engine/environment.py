"""What makes float results reproducible: torch version, CPU kernel level, threads, device.

A replay is bit-exact only where these match the recording. The Recorder stores them in the
manifest; replay applies the thread count and names every other difference, so a verdict never
promises bit-for-bit agreement that the machine cannot give.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# Keys whose difference changes floating-point results (kernels, reduction order). Replay asks
# for deterministic kernels itself and names the ops that have none, so that flag is not here.
NUMERIC_KEYS = ("torch", "cpu_capability", "device")


def capture(device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cpu")
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device.type,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        env["device"] = f"cuda ({torch.cuda.get_device_name(device)})"
    return env


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences that can change float results, e.g. 'cpu_capability AVX512 -> AVX2'."""
    keys = (*NUMERIC_KEYS, "threads")
    return [
        f"{k} {recorded[k]} -> {current.get(k)}"
        for k in keys
        if k in recorded and recorded[k] != current.get(k)
    ]


@contextlib.contextmanager
def deterministic(found: list[str]) -> Iterator[None]:
    """Ask torch for deterministic kernels while replaying; the ops that have none are
    appended to ``found`` (torch warns about them instead of failing)."""
    with deterministic_algorithms(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        if "deterministic" in text and text not in found:
            found.append(text.splitlines()[0])


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic kernels on or off (warn only: an op with none still runs), and
    the process's own setting back afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@contextlib.contextmanager
def recorded_threads(recorded: Mapping[str, Any]) -> Iterator[None]:
    """Run with the recording's intra-op thread count (reduction order depends on it)."""
    wanted, before = recorded.get("threads"), torch.get_num_threads()
    if isinstance(wanted, int) and wanted > 0 and wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

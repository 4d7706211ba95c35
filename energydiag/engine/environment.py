"""What makes float results reproducible: torch version, CPU kernel level, threads, device.

A replay is bit-exact only where these match the recording. The Recorder stores them in the
manifest; replay applies the thread count and names every other difference, so a verdict never
promises bit-for-bit agreement that the machine cannot give.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# Keys whose difference changes floating-point results (kernels, reduction order).
NUMERIC_KEYS = ("torch", "cpu_capability", "device", "deterministic")


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

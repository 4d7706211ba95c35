"""Statistics of a tensor that cannot overflow, in one chunked pass.

A float32 L2 norm of a finite tensor whose values are near 1e20 is already +Inf, and so is its
variance: exactly the exploded-but-finite weights that precede most real NaNs. Here each chunk
is summarised in float64 (a float32 value squared is at most 1.2e77, far inside float64) and
chunks are merged with Chan's parallel formula, so memory stays at one chunk and no finite
tensor reports an infinite statistic. Whether the *square* overflows float32 is kept as a fact:
it says the next norm, variance or softmax computed in float32 will overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

CHUNK = 1 << 20
FP32_MAX = torch.finfo(torch.float32).max
FP32_SQUARE_LIMIT = math.sqrt(FP32_MAX)  # ~1.8e19: beyond it x*x is +Inf in float32


@dataclass
class TensorSummary:
    """Counts of non-finite values and exact statistics of the finite ones (NaN when none)."""

    shape: list[int]
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    finite_count: int = 0
    min: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    std: float = math.nan
    l2: float = math.nan
    zeros: int = 0

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.posinf == 0 and self.neginf == 0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def max_abs(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite_count else math.nan

    @property
    def rms(self) -> float:
        return self.l2 / math.sqrt(self.finite_count) if self.finite_count else math.nan

    @property
    def square_overflows_fp32(self) -> bool:
        return self.finite_count > 0 and self.max_abs > FP32_SQUARE_LIMIT

    def describe(self) -> str:
        bad = [
            f"{n} {k}"
            for k, n in (("NaN", self.nan), ("+Inf", self.posinf), ("-Inf", self.neginf))
            if n
        ]
        rng = f"[{self.min:.4g}, {self.max:.4g}]" if self.finite_count else "[no finite values]"
        return f"{self.shape} finite range {rng}" + (f", {', '.join(bad)}" if bad else "")


class _Moments:
    """Running count, mean, M2 (sum of squared deviations), sum of squares, extrema, zeros."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.sq = 0, 0.0, 0.0, 0.0
        self.lo, self.hi, self.zeros = math.inf, -math.inf, 0

    def add(self, x: torch.Tensor) -> None:
        """Merge one float64 chunk of finite values."""
        n = x.numel()
        if n == 0:
            return
        lo, hi = torch.aminmax(x)
        mean = x.mean()
        centred = x - mean
        m2, sq, zeros = (centred * centred).sum(), (x * x).sum(), (x == 0).sum()
        lo, hi, mean, m2, sq, zeros = torch.stack([lo, hi, mean, m2, sq, zeros.double()]).tolist()
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n, self.sq, self.zeros = total, self.sq + sq, self.zeros + int(zeros)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)


def summarize(t: torch.Tensor, chunk: int = CHUNK) -> TensorSummary:
    """Exact counts and float64 statistics of a tensor, one chunk at a time."""
    out = TensorSummary(list(t.shape))
    if not t.is_floating_point() or t.numel() == 0:
        return out
    flat = t.detach().reshape(-1)
    scale = _scale_of(flat) if t.dtype == torch.float64 else 1.0
    moments = _Moments()
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk].double()
        if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
            out.nan += int(x.isnan().sum())
            out.posinf += int((x == math.inf).sum())
            out.neginf += int((x == -math.inf).sum())
            x = x[torch.isfinite(x)]
        moments.add(x / scale if scale != 1.0 else x)
    _finish(out, moments, scale)
    return out


def _scale_of(flat: torch.Tensor) -> float:
    """float64 values can overflow even float64 when squared: divide by a power of two first."""
    finite = flat[torch.isfinite(flat)]
    peak = float(finite.abs().max()) if finite.numel() else 0.0
    return 2.0 ** math.floor(math.log2(peak)) if peak > 1e150 else 1.0


def _finish(out: TensorSummary, m: _Moments, scale: float) -> None:
    out.finite_count, out.zeros = m.n, m.zeros
    if m.n == 0:
        return
    out.min, out.max, out.mean = m.lo * scale, m.hi * scale, m.mean * scale
    out.std = math.sqrt(max(m.m2, 0.0) / (m.n - 1)) * scale if m.n > 1 else 0.0
    out.l2 = math.sqrt(m.sq) * scale


def float_tensors(obj: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Screen with one float32 sum per tensor: any NaN or Inf makes the total non-finite. A finite
    total proves finiteness; a non-finite one may be an overflowing sum of finite values, so only
    then does each tensor get the exact check."""
    if not tensors:
        return True
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors]
    total = sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].device) for s in sums]).sum()
    if math.isfinite(float(total)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over many tensors in their own precision: what clip_grad_norm_ computes, and
    cheap. It is +Inf for finite tensors whose squares overflow; report ``exact_global_norm``."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def exact_global_norm(tensors: list[torch.Tensor]) -> float:
    """The same norm accumulated in float64, one tensor at a time: finite for finite tensors."""
    scale = max((summarize(t).max_abs for t in tensors if t.numel()), default=0.0)
    if not math.isfinite(scale) or scale == 0.0:
        return scale if math.isnan(scale) else 0.0
    total = sum(float(torch.linalg.vector_norm(t.detach().double() / scale)) ** 2 for t in tensors)
    return math.sqrt(total) * scale

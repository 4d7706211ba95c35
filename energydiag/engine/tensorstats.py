"""Statistics of a tensor that cannot overflow, in one chunked pass.

A float32 L2 norm of a finite tensor whose values are near 1e20 is already +Inf, and so is its
variance: exactly the exploded-but-finite weights that precede most real NaNs. Here each chunk
is summarised with float32 reductions, scaled into [-1, 1] first when its values are large
enough for a square to overflow, and chunks are merged with Chan's parallel formula in double precision, so
memory stays at one chunk and no finite tensor reports an infinite statistic. Whether the *square* overflows float32 is kept as a fact:
it says the next norm, variance or softmax computed in float32 will overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from energydiag.schema import Record

CHUNK = 1 << 22
FP32_MAX = torch.finfo(torch.float32).max
FP32_SQUARE_LIMIT = math.sqrt(FP32_MAX)  # ~1.8e19: beyond it x*x is +Inf in float32
SCALE_ABOVE = 1e15  # a chunk whose peak is above this (or below its inverse) is rescaled


@dataclass
class TensorSummary(Record):
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
    """Running count, mean, M2 (sum of squared deviations), sum of squares, extrema and zeros,
    merged per chunk with Chan's formula in Python floats (double precision, no overflow)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.sq = 0, 0.0, 0.0, 0.0
        self.lo, self.hi, self.zeros = math.inf, -math.inf, 0

    def add(self, x: torch.Tensor, lo: float, hi: float) -> None:
        """Merge one chunk of finite values whose extrema are already known.

        Float32 reductions (cascaded sums on CPU) keep this as fast as a plain max or norm; a
        chunk whose squares could overflow (or underflow) float32 is scaled near [-1, 1] first.
        """
        n = x.numel()
        if n == 0:
            return
        peak = max(abs(lo), abs(hi))
        outside = peak > SCALE_ABOVE or 0.0 < peak < 1.0 / SCALE_ABOVE
        scale = 2.0 ** math.floor(math.log2(peak)) if outside else 1.0  # a power of two: exact
        y = x / scale if scale != 1.0 else x
        mean = float(y.sum()) / n
        m2 = float(torch.linalg.vector_norm(y - mean)) ** 2 * scale * scale
        sq = float(torch.linalg.vector_norm(y)) ** 2 * scale * scale
        mean *= scale
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n, self.sq = total, self.sq + sq
        self.zeros += n - int(torch.count_nonzero(x))
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)


def summarize(t: torch.Tensor, chunk: int = CHUNK) -> TensorSummary:
    """Exact counts and double-precision statistics of a tensor, one chunk at a time.

    Per chunk: extrema (which also reveal any NaN or Inf), var_mean, and a zero count; only a
    chunk holding non-finite values pays for counting and filtering them.
    """
    out = TensorSummary(list(t.shape))
    if not t.is_floating_point() or t.numel() == 0:
        return out
    if t.dtype == torch.float64:
        huge = _float64_scale(t)
        if huge != 1.0:
            return _rescaled(summarize(t / huge, chunk), huge)
    flat = t.detach().reshape(-1)
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    moments = _Moments()
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk].to(wide)
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            out.nan += int(x.isnan().sum())
            out.posinf += int((x == math.inf).sum())
            out.neginf += int((x == -math.inf).sum())
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                continue
            lo, hi = float(x.min()), float(x.max())
        moments.add(x, lo, hi)
    _finish(out, moments)
    return out


def _float64_scale(t: torch.Tensor) -> float:
    """float64 values beyond 1e150 overflow even double precision when squared."""
    finite = t[torch.isfinite(t)]
    peak = float(finite.abs().max()) if finite.numel() else 0.0
    return 2.0 ** math.floor(math.log2(peak)) if peak > 1e150 else 1.0


def _rescaled(s: TensorSummary, scale: float) -> TensorSummary:
    s.min, s.max, s.mean, s.std, s.l2 = (v * scale for v in (s.min, s.max, s.mean, s.std, s.l2))
    return s


def _finish(out: TensorSummary, m: _Moments) -> None:
    out.finite_count, out.zeros = m.n, m.zeros
    if m.n == 0:
        return
    out.min, out.max, out.mean = m.lo, m.hi, m.mean
    out.std = math.sqrt(max(m.m2, 0.0) / (m.n - 1)) if m.n > 1 else 0.0
    out.l2 = math.sqrt(m.sq)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP parameter's shard, or a norm over shards) as the whole tensor, which
    every rank computes alike (a collective under FSDP); any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard of a DTensor this rank holds (no collective), or the tensor itself: checks
    whose outcome may differ between ranks must not run collectives on some ranks only."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def tensors_in(obj: object) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs, in pytree order: lists, tuples and dicts
    are all an op holds, and walking them by hand takes two thirds of the time of pytree's
    general flatten, which is paid on every op the instrument sees."""
    found: list[torch.Tensor] = []
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            pending.extend(reversed(list(item.values())))
    return found


def float_tensors(obj: object) -> list[torch.Tensor]:
    return [t for t in tensors_in(obj) if t.is_floating_point()]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Screen with one float32 sum per tensor: any NaN or Inf makes the total non-finite. A finite
    total proves finiteness; a non-finite one may be an overflowing sum of finite values, so only
    then does each tensor get the exact check."""
    if not tensors:
        return True
    sums = [plain(t.detach().sum(dtype=torch.float32)) for t in tensors]
    total = sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].device) for s in sums]).sum()
    if math.isfinite(float(total)):
        return True
    return all(bool(torch.isfinite(plain(t)).all()) for t in tensors)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over many tensors in their own precision: what clip_grad_norm_ computes, and
    cheap. It is +Inf for finite tensors whose squares overflow; report ``exact_global_norm``."""
    if not tensors:
        return torch.zeros(())
    return plain(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))


def exact_global_norm(tensors: list[torch.Tensor]) -> float:
    """The same norm accumulated in float64, one tensor at a time: finite for finite tensors."""
    tensors = [plain(t) for t in tensors]
    scale = max((summarize(t).max_abs for t in tensors if t.numel()), default=0.0)
    if not math.isfinite(scale) or scale == 0.0:
        return scale if math.isnan(scale) else 0.0
    total = sum(float(torch.linalg.vector_norm(t.detach().double() / scale)) ** 2 for t in tensors)
    return math.sqrt(total) * scale

"""The contrastive failure modes nobody checks, measured on one batch and its energy matrix.

Swap InfoNCE treats every other action in the batch as a negative. Repeated actions (a robot's
no-op, a held gripper) are false negatives: a row with k copies of its positive cannot go below
ln(k + (B − k)·e^(−span/τ)), so the loss has a higher floor than the plain bound. How much each
row learns from its negatives shows in the softmax over them: its effective number
N_eff = exp(entropy) and the share the hardest one takes. If every context looks alike (RankMe
near 1, cosines near 1), no head can tell the rows apart.
"""

from __future__ import annotations

import math

import torch

DUPLICATE_REL = 1e-3  # two actions are "the same" within this fraction of the actions' RMS


def duplicate_counts(x: torch.Tensor, rel: float = DUPLICATE_REL) -> torch.Tensor:
    """Per row, how many rows of ``x`` [B, ...] (itself included) lie within ``rel`` × the RMS
    of ``x`` of it, by Euclidean distance over the flattened row."""
    flat = x.detach().double().reshape(x.shape[0], -1)
    scale = flat.square().mean().sqrt().clamp_min(1e-12) * math.sqrt(flat.shape[1])
    return (torch.cdist(flat, flat) <= rel * scale).sum(dim=1)


def duplicate_floor(counts: torch.Tensor, span: float, tau: float) -> float:
    """mean_i ln(k_i + (B − k_i)·e^(−span/τ)): the lowest loss duplicated positives allow."""
    b = counts.numel()
    k = counts.double()
    shrink = math.exp(-span / tau) if math.isfinite(span) else 0.0
    return float(torch.log(k + (b - k) * shrink).mean())


def negative_spread(
    matrix: torch.Tensor, tau: float, positive_first: bool = False
) -> dict[str, float]:
    """Per row, the softmax over its negatives at τ: effective negatives over B − 1 (1 = all
    weigh alike, no signal; → 0 = one dominates), the hardest one's share, and the fraction of
    negatives scored below their row's positive (E_ij < E_ii)."""
    e = matrix.detach().double()
    b, m = e.shape
    cols = torch.arange(m, device=e.device)
    target = torch.zeros(b, dtype=torch.long) if positive_first else torch.arange(b)
    negative = cols[None, :] != target.to(e.device)[:, None]
    neg = e[negative].reshape(b, m - 1)
    pos = e[torch.arange(b), target.to(e.device)]
    p = torch.softmax(-neg / tau, dim=1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    return {
        "effective_negatives_ratio": float((entropy.exp() / (m - 1)).mean()),
        "hardest_negative_share": float(p.max(dim=1).values.mean()),
        "hard_negative_fraction": float((neg < pos[:, None]).double().mean()),
    }


def zero_sum_violation(
    matrix: torch.Tensor, tau: float, positive_first: bool = False
) -> dict[str, float]:
    """The logit gradient of a softmax cross-entropy row, p − onehot, sums to 0 exactly; in the
    dtype the energies were computed in, a positive probability that rounds to 1 loses its
    gradient while the negatives keep theirs (float absorption). Per row |Σ g| / Σ |g|."""
    dtype = matrix.dtype if matrix.is_floating_point() else torch.float32
    e = matrix.detach().to(dtype)
    b, m = e.shape
    target = torch.zeros(b, dtype=torch.long) if positive_first else torch.arange(b)
    grad = torch.softmax(-e / tau, dim=1)
    grad[torch.arange(b), target.to(e.device)] -= 1
    ratio = grad.double().sum(1).abs() / grad.double().abs().sum(1).clamp_min(1e-300)
    return {"zero_sum_violation": float(ratio.max()), "absorbed_rows": float((ratio > 1e-3).sum())}


def context_rank(h: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict[str, float]:
    """RankMe (exp of the entropy of the normalised singular values) of the contexts pooled over
    their unmasked positions, its ratio to min(B, D), and their largest and mean off-diagonal
    cosine (Wang–Isola's uniformity is near 0 exactly when these are near 1)."""
    x = h.detach().double()
    if x.dim() == 3:
        keep = (
            (~pad_mask).unsqueeze(-1).double()
            if pad_mask is not None
            else torch.ones_like(x[..., :1])
        )
        x = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    x = x.reshape(x.shape[0], -1)
    sigma = torch.linalg.svdvals(x)  # not centred: contexts that all point one way have rank ~1
    p = sigma / sigma.sum().clamp_min(1e-300)
    rankme = float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum())) if sigma.sum() > 0 else 1.0
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cosine = unit @ unit.T
    off = cosine[~torch.eye(x.shape[0], dtype=torch.bool)]
    return {
        "rankme": rankme,
        "rank_ratio": rankme / min(x.shape),
        "max_cosine": float(off.max()) if off.numel() else 0.0,
        "mean_cosine": float(off.mean()) if off.numel() else 0.0,
    }


def input_scales(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per float input of two or more dims: RMS of its per-feature means, of its per-feature
    standard deviations (features = the last dim), and its overall RMS."""
    scales = {}
    for key, t in tensors.items():
        if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] < 1 or t.numel() < 4:
            continue
        x = t.detach().double().reshape(-1, t.shape[-1])
        scales[key] = {
            "offset": float(x.mean(0).square().mean().sqrt()),
            "spread": float(x.std(0, correction=0).square().mean().sqrt()),
            "rms": float(x.square().mean().sqrt()),
        }
    return scales


def measure(
    data: dict[str, torch.Tensor],
    matrix: torch.Tensor,
    tau: float | None,
    positive_first: bool,
    head_span: float | None = None,
) -> dict[str, float]:
    """Every quantity above that the batch allows, as plain floats. ``head_span``: the range a
    bounded head allows, so the logit span it permits is known before training reaches it."""
    out: dict[str, float] = {"batch_size": float(matrix.shape[0])}
    inputs = [t for k, t in data.items() if k in ("h", "a_pos") and t.is_floating_point()]
    if not torch.isfinite(matrix.detach()).all() or not all(
        torch.isfinite(t).all() for t in inputs
    ):
        return out  # statistics of NaN say nothing (and an SVD of them fails): the fault is named
    if "a_pos" in data:
        counts = duplicate_counts(data["a_pos"])
        out["duplicate_action_rows"] = float((counts > 1).double().mean())
        out["duplicate_action_k_mean"] = float(counts.double().mean())
        if tau and not positive_first:
            span = float(matrix.detach().max() - matrix.detach().min())
            out["duplicate_floor"] = duplicate_floor(counts, span, tau)
            out["logit_span"] = span / tau
        if tau and head_span is not None and math.isfinite(head_span):
            out["logit_span_allowed"] = head_span / tau
    if "h" in data and data["h"].shape[0] > 1:
        out |= context_rank(data["h"], data.get("pad_mask"))
    if tau and matrix.shape[1] > 1:
        out |= negative_spread(matrix, tau, positive_first)
        out |= zero_sum_violation(matrix, tau, positive_first)
    return out

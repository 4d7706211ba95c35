"""Energy losses: in-batch swap InfoNCE, InfoNCE with explicit negatives, and a margin loss.

Every loss has the plug-in signature ``loss(model, batch, **kwargs) -> (loss, diagnostics)`` so
the Recorder, replay and inspect call built-ins and user losses the same way. Convention
throughout: low energy = good, so the positive must end *below* its negatives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Batch = Mapping[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def energies(
    model: nn.Module, h: torch.Tensor, a: torch.Tensor, pad_mask: torch.Tensor | None
) -> torch.Tensor:
    """Call a model plug-in and return a flat [N] energy vector.

    Plug-ins may return [N, 1], [N], or a tuple whose first item is the energy.
    """
    out = model(h, a, pad_mask)
    if isinstance(out, tuple | list):
        out = out[0]
    return out.reshape(out.shape[0], -1)[:, 0] if out.dim() > 1 else out


def energy_matrix(
    model: nn.Module,
    h: torch.Tensor,
    a: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    max_pairs: int | None = None,
) -> torch.Tensor:
    """E[i, j] = E(h_i, a_j) for every pair in the batch, as a [B, B] matrix.

    With ``max_pairs`` the B² pairs are built in row chunks, so at most that many replicated
    contexts exist at once (the seed report's memory worry about B² replication).
    """
    b = h.shape[0]
    rows = b if max_pairs is None else max(1, min(b, max_pairs // b))
    chunks = [_energy_rows(model, h, a, pad_mask, i, min(b, i + rows)) for i in range(0, b, rows)]
    return torch.cat(chunks, dim=0)


def _energy_rows(
    model: nn.Module,
    h: torch.Tensor,
    a: torch.Tensor,
    pad_mask: torch.Tensor | None,
    start: int,
    stop: int,
) -> torch.Tensor:
    b, n = a.shape[0], stop - start
    h_rep = h[start:stop].unsqueeze(1).expand(n, b, *h.shape[1:]).reshape(n * b, *h.shape[1:])
    a_rep = a.unsqueeze(0).expand(n, *a.shape).reshape(n * b, *a.shape[1:])
    m_rep = None
    if pad_mask is not None:
        m = pad_mask[start:stop]
        m_rep = m.unsqueeze(1).expand(n, b, *m.shape[1:]).reshape(n * b, *m.shape[1:])
    return energies(model, h_rep, a_rep, m_rep).view(n, b)


def inbatch_infonce(
    model: nn.Module, batch: Batch, tau: float = 0.5, max_pairs: int | None = None
) -> LossOutput:
    """Swap InfoNCE: row i scores context i against every action; the diagonal is the target."""
    e = energy_matrix(model, batch["h"], batch["a_pos"], batch.get("pad_mask"), max_pairs)
    logits = -e / tau
    labels = torch.arange(e.shape[0], device=e.device)
    loss = F.cross_entropy(logits, labels)
    off_diagonal = e[~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)]
    return loss, _pos_neg_diagnostics(e.diagonal(), off_diagonal, energy_matrix=e)


def gathered_infonce(model: nn.Module, batch: Batch, tau: float = 0.5) -> LossOutput:
    """Swap InfoNCE whose candidates are every rank's actions: with W ranks of B samples, each
    positive meets B·W − 1 negatives instead of B − 1. The actions are data, so a plain
    all_gather (no autograd through it) suffices; every rank must hold the same B."""
    a, offset = batch["a_pos"], 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(a) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, a.contiguous())
        a, offset = torch.cat(parts), dist.get_rank() * a.shape[0]
    e = energy_matrix(model, batch["h"], a, batch.get("pad_mask"))
    rows = torch.arange(e.shape[0], device=e.device)
    loss = F.cross_entropy(-e / tau, rows + offset)
    positive = torch.zeros_like(e, dtype=torch.bool)
    positive[rows, rows + offset] = True
    e_pos, e_neg = e[positive], e[~positive].view(e.shape[0], -1)
    return loss, _pos_neg_diagnostics(e_pos, e_neg, candidate_energies=_candidates(e_pos, e_neg))


gathered_infonce.gathers_across_ranks = True  # replays on its recorded ranks only


def stacked_negatives(batch: Batch) -> torch.Tensor:
    """Explicit negatives [B, M, H, Da] from ``a_neg`` or ``layer_actions.<i>`` keys."""
    if "a_neg" in batch:
        return batch["a_neg"]
    keys = sorted((k for k in batch if k.startswith("layer_actions.")), key=_index_suffix)
    if not keys:
        raise KeyError("batch has no negatives: expected 'a_neg' or 'layer_actions.<i>' tensors")
    return torch.stack([batch[k] for k in keys], dim=1)


def infonce_negatives(model: nn.Module, batch: Batch, tau: float = 0.5) -> LossOutput:
    """InfoNCE of each positive against its own M negatives (target index 0)."""
    e_pos, e_neg = _pos_and_negatives(model, batch)
    scored = _candidates(e_pos, e_neg)
    logits = -scored / tau
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), _pos_neg_diagnostics(
        e_pos, e_neg, candidate_energies=scored
    )


def margin(model: nn.Module, batch: Batch, margin: float = 0.5) -> LossOutput:
    """Hinge: relu(margin + E_pos - E_neg). Zero once every positive sits ``margin`` below.

    The seed report wrote relu(E_neg - E_pos + margin), which rewards *higher* positive energy.
    """
    e_pos, e_neg = _pos_and_negatives(model, batch)
    loss = F.relu(margin + e_pos[:, None] - e_neg).mean()
    return loss, _pos_neg_diagnostics(e_pos, e_neg, candidate_energies=_candidates(e_pos, e_neg))


def _pos_and_negatives(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    h, a, pm = batch["h"], batch["a_pos"], batch.get("pad_mask")
    neg = stacked_negatives(batch)
    b, m = neg.shape[:2]
    e_pos = energies(model, h, a, pm)
    h_rep = h.unsqueeze(1).expand(b, m, *h.shape[1:]).reshape(b * m, *h.shape[1:])
    pm_rep = None if pm is None else pm.unsqueeze(1).expand(b, m, *pm.shape[1:]).flatten(0, 1)
    e_neg = energies(model, h_rep, neg.flatten(0, 1), pm_rep).view(b, m)
    return e_pos, e_neg


def _candidates(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """Each row's positive (column 0) and its own negatives: [B, 1 + M]."""
    return torch.cat([e_pos[:, None], e_neg], dim=1)


def _pos_neg_diagnostics(
    e_pos: torch.Tensor, e_neg: torch.Tensor, **scored: torch.Tensor
) -> dict[str, torch.Tensor]:
    """E_pos and E_neg means, plus the energies the loss scored: ``energy_matrix`` [B, B] with
    positives on the diagonal, or ``candidate_energies`` [B, 1 + M] with positives in column 0."""
    return {
        "E_pos": e_pos.detach().mean(),
        "E_neg": e_neg.detach().mean(),
        **{k: v.detach() for k, v in scored.items()},
    }


def _index_suffix(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


BUILTIN: dict[str, Callable[..., LossOutput]] = {
    "inbatch_infonce": inbatch_infonce,
    "infonce_negatives": infonce_negatives,
    "margin": margin,
}

"""Model, optimizer and RNG state as flat, named tensors (and back).

Optimizer state is stored by *parameter name* rather than by torch's positional index, so a
checkpoint stays readable (``optim.head.0.weight.exp_avg``) and survives a change in the order
parameters were handed to the optimizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

MODEL_PREFIX = "model."
COMPILED = "_orig_mod."  # torch.compile's wrapper, at any depth
DATA_PARALLEL = "module."  # DDP / DataParallel wrapper, leading only
OPTIM_PREFIX = "optim."
RNG_PREFIX = "rng."


def plain_key(key: str) -> str:
    """A state-dict key as the unwrapped model names it: 'module._orig_mod.fc.w' -> 'fc.w'."""
    key = key.replace(COMPILED, "")
    while key.startswith(DATA_PARALLEL):
        key = key[len(DATA_PARALLEL) :].replace(COMPILED, "")
    return key


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in torch's index order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            names.append(by_id[id(p)])
    return names


def unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every tensor that shares memory with an earlier one copied: tied weights
    (an LM head tied to its embedding) are one storage under two names, which safetensors
    refuses to write; each name then loads on its own and, values equal, ties stay intact."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if ptr in seen else value
        if ptr is not None:
            seen.add(ptr)
    return out


def pack_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {MODEL_PREFIX + k: v for k, v in unshared(model.state_dict()).items()}
    meta: dict[str, str] = {}
    if optimizer is None:
        return tensors, meta
    names = param_names(model, optimizer)
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, object]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{names[idx]}.{key}"] = value
            else:
                scalars.setdefault(names[idx], {})[key] = value
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    meta["optimizer"] = type(optimizer).__name__
    meta["param_groups"] = json.dumps(groups)
    meta["optim_scalars"] = json.dumps(scalars)
    return tensors, meta


def split_state(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model_sd = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optim = {k[len(OPTIM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    return model_sd, optim


def optimizer_state_dict(
    optim_tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict:
    """Rebuild torch's positional optimizer state dict from our named tensors."""
    names = param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    groups = json.loads(meta["param_groups"])
    scalars = json.loads(meta.get("optim_scalars", "{}"))
    state: dict[int, dict[str, object]] = {}
    for key, value in optim_tensors.items():
        name, field = key.rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    for name, fields in scalars.items():
        state.setdefault(index[name], {}).update(fields)
    for g in groups:
        g["params"] = [index[n] for n in g["params"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> dict[str, torch.Tensor]:
    """The generator states a step starts from; restoring them makes dropout replay exactly."""
    rng = {RNG_PREFIX + "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"{RNG_PREFIX}cuda.{i}"] = s
    return rng


def restore_rng(rng: Mapping[str, torch.Tensor]) -> None:
    if RNG_PREFIX + "cpu" in rng:
        torch.set_rng_state(rng[RNG_PREFIX + "cpu"])
    cuda = sorted(k for k in rng if k.startswith(RNG_PREFIX + "cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])


HYPERPARAMETERS = "hyperparameters"


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, object]]:
    """Each param group's scalar settings (lr, betas, eps, weight_decay, momentum...) right now.

    Recorded with every batch, so a schedule replays without serialising the scheduler.
    """
    groups = []
    for group in optimizer.param_groups:
        kept: dict[str, object] = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool | int | float) or (
                isinstance(value, tuple) and all(isinstance(v, int | float) for v in value)
            ):
                kept[key] = value
        groups.append(kept)
    return groups


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, object]]
) -> None:
    """Set recorded scalar settings back on the optimizer's param groups, before its step.

    A tensor-valued setting (a capturable lr) is filled in place so the optimizer keeps its
    tensor; everything else is assigned.
    """
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"recorded {len(groups)} param group(s), the optimizer has {len(optimizer.param_groups)}"
        )
    for group, recorded in zip(optimizer.param_groups, groups, strict=True):
        for key, value in recorded.items():
            current = group.get(key)
            if isinstance(current, torch.Tensor):
                current.fill_(value)
            else:
                group[key] = tuple(value) if isinstance(value, list) else value


SCALER_STATE = "scaler"


def scaler_settings(scaler: object) -> dict[str, float]:
    """A GradScaler's construction settings, for the manifest."""
    state = scaler.state_dict()
    return {
        "init_scale": state["scale"],
        **{k: state[k] for k in ("growth_factor", "backoff_factor", "growth_interval")},
    }

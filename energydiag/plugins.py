"""Turning the manifest's import strings into a model, a loss and an optimizer."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from energydiag.errors import DiagError
from energydiag.losses import BUILTIN, LossOutput
from energydiag.manifest import LossSpec, ModelSpec, OptimizerSpec

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], LossOutput]


def resolve(target: str, what: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise DiagError(None, f"cannot import {what} {target!r}: {err}") from None
    return obj


def build_model(spec: ModelSpec) -> nn.Module:
    factory = resolve(spec.target, "model factory")
    try:
        model = factory(**spec.kwargs)
    except TypeError as err:
        raise DiagError(None, f"model factory {spec.target!r} rejected its kwargs: {err}") from None
    if not isinstance(model, nn.Module):
        raise DiagError(None, f"model factory {spec.target!r} returned {type(model).__name__}")
    if spec.forward_kwargs:
        # Bound on the instance, so hooks, state_dict keys and checkpoints stay exactly as they were.
        model.forward = functools.partial(model.forward, **spec.forward_kwargs)
    return model


def build_loss(spec: LossSpec, **overrides: Any) -> LossFn:
    """The loss with its manifest kwargs bound; ``overrides`` win (what-if replays use them)."""
    if spec.name is not None:
        if spec.name not in BUILTIN:
            raise DiagError(None, f"unknown built-in loss {spec.name!r} ({', '.join(BUILTIN)})")
        fn = BUILTIN[spec.name]
    else:
        fn = resolve(spec.target, "loss")
    return functools.partial(_as_loss_output, fn, {**spec.kwargs, **overrides})


def _as_loss_output(fn: Callable[..., Any], kwargs: dict[str, Any], model, batch) -> LossOutput:
    out = fn(model, batch, **kwargs)
    return out if isinstance(out, tuple) else (out, {})


def build_optimizer(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, spec.name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise DiagError(None, f"unknown optimizer {spec.name!r} (expected a torch.optim class)")
    try:
        return cls(model.parameters(), **spec.kwargs)
    except (TypeError, ValueError) as err:
        raise DiagError(None, f"optimizer {spec.name} rejected its kwargs: {err}") from None

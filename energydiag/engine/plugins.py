"""Turning the manifest's import strings into a model, a loss and an optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from energydiag.engine.registry import BUILTIN_LOSSES, resolve
from energydiag.errors import DiagError, first_line
from energydiag.io.manifest import LossSpec, ModelSpec, OptimizerSpec
from energydiag.io.state import plain_key

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], LossOutput]


def build_model(spec: ModelSpec) -> nn.Module:
    factory = resolve(spec.target, "model factory")
    try:
        model = factory(**spec.kwargs)
    except Exception as err:  # the user's factory: any failure is about the kwargs it was given
        raise DiagError(
            None, f"model factory {spec.target!r} failed on model.kwargs: {first_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise DiagError(None, f"model factory {spec.target!r} returned {type(model).__name__}")
    if spec.forward_kwargs:
        # Bound on the instance, so hooks, state_dict keys and checkpoints stay exactly as they were.
        model.forward = functools.partial(model.forward, **spec.forward_kwargs)
    return model


def build_loss(spec: LossSpec, **overrides: Any) -> LossFn:
    """The loss with its manifest kwargs bound; ``overrides`` win (what-if replays use them)."""
    if spec.name is not None:
        if spec.name not in BUILTIN_LOSSES:
            known = ", ".join(BUILTIN_LOSSES)
            raise DiagError(None, f"unknown built-in loss {spec.name!r} ({known})")
        fn = resolve(BUILTIN_LOSSES[spec.name], "loss")
    else:
        fn = resolve(spec.target, "loss")
    return functools.partial(_as_loss_output, fn, {**spec.kwargs, **overrides})


def loss_gathers(loss_fn: LossFn) -> bool:
    """A loss that declares ``gathers_across_ranks = True`` meets other ranks' data in its
    forward: it cannot be replayed by fewer processes than recorded it."""
    target = loss_fn.args[0] if isinstance(loss_fn, functools.partial) else loss_fn
    return bool(getattr(target, "gathers_across_ranks", False))


def _as_loss_output(fn: Callable[..., Any], kwargs: dict[str, Any], model, batch) -> LossOutput:
    out = fn(model, batch, **kwargs)
    return out if isinstance(out, tuple) else (out, {})


def build_optimizer(
    spec: OptimizerSpec, model: nn.Module, groups: list[list[str]] | None = None
) -> torch.optim.Optimizer:
    """The run's optimizer over the model; ``groups`` (parameter names per param group, as the
    checkpoint recorded them) rebuild a grouped optimizer (decay/no-decay, per-module lr) with
    its groups and parameter order, which torch needs to load the saved state."""
    cls = getattr(torch.optim, spec.name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise DiagError(None, f"unknown optimizer {spec.name!r} (expected a torch.optim class)")
    params: Any = model.parameters()
    if groups is not None:
        named = {plain_key(n): p for n, p in model.named_parameters()}
        unknown = next((n for g in groups for n in g if plain_key(n) not in named), None)
        if unknown is not None:
            raise DiagError(None, f"the checkpoint's optimizer holds {unknown!r}: not in the model")
        params = [{"params": [named[plain_key(n)] for n in g]} for g in groups]
    try:
        return cls(params, **spec.kwargs)
    except Exception as err:  # torch.optim validates its kwargs with several exception types
        raise DiagError(
            None, f"optimizer {spec.name} rejected optimizer.kwargs: {first_line(err)}"
        ) from None


def check_model_spec(spec: ModelSpec, live: nn.Module) -> None:
    """Build the spec's model on the meta device and compare its state-dict keys and shapes with
    the live model, so a spec that cannot rebuild the model fails at recording, not at replay."""
    with torch.device("meta"):
        built = build_model(spec)
    ours = {plain_key(k): tuple(v.shape) for k, v in built.state_dict().items()}
    theirs = {plain_key(k): tuple(v.shape) for k, v in live.state_dict().items()}
    differ = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
    if differ:
        key = differ[0]
        raise DiagError(
            None,
            f"model_spec {spec.target!r} does not build the model being trained: {key!r} is "
            f"{ours.get(key, 'absent')} in the spec's model and {theirs.get(key, 'absent')} in "
            f"the live one ({len(differ)} key(s) differ)",
        )

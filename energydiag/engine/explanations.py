"""The evidence gathered at the op where a non-finite value began, one explanation per op.

Each explanation measures what its op's inputs held (zero denominators, a log's non-positive
inputs, values past a dtype's range...) and, when the measurement shows one, names its cause
(``"cause": kind``); ``findings.faults`` holds one account of each kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from energydiag.engine.instrument import OpCall
from energydiag.engine.tensorstats import float_tensors, summarize

aten = torch.ops.aten

Explain = Callable[[OpCall], dict[str, Any]]
# In-place variants are registered only where the operand explained is read, not written: by the
# time an observer looks, a written operand already holds the result.
EXPLAIN: dict[Any, Explain] = {}
# Every cause an explanation can name in its evidence ("cause": kind): the findings hold one
# account of each, and tests/test_rules.py checks that the two lists are the same.
CAUSES: set[str] = set()


def explains(*packets: Any, causes: tuple[str, ...] = ()) -> Callable[[Explain], Explain]:
    """Register the evidence gathered when one of these ops is where a non-finite value began,
    and the causes (``causes``) that evidence may name when it shows one."""

    def register(fn: Explain) -> Explain:
        for packet in packets:
            if packet in EXPLAIN:  # two explanations of one op: which would win is an accident
                raise ValueError(f"{packet} is already explained by {EXPLAIN[packet].__name__}")
            EXPLAIN[packet] = fn
        CAUSES.update(causes)
        return fn

    return register


def _caused(kind: str, holds: bool) -> dict[str, str]:
    return {"cause": kind} if holds else {}


def _first_index(mask: torch.Tensor) -> list[int] | None:
    hits = torch.nonzero(mask)
    return hits[0].tolist() if len(hits) else None


@explains(aten.log, aten.log2, aten.log10, aten.log1p, causes=("log_of_nonpositive",))
def _log(call: OpCall) -> dict[str, Any]:
    x = call.args[0].detach()
    limit = -1 if call.packet is aten.log1p else 0
    zeros, negatives = int((x == limit).sum()), int((x < limit).sum())
    return {
        "zero_inputs": zeros,
        "negative_inputs": negatives,
        "first_bad_index": _first_index(x <= limit),
    } | _caused("log_of_nonpositive", bool(zeros or negatives))


@explains(aten.sqrt, aten.rsqrt, causes=("sqrt",))
def _sqrt(call: OpCall) -> dict[str, Any]:
    x = call.args[0].detach()
    return {
        "zero_inputs": int((x == 0).sum()),
        "negative_inputs": int((x < 0).sum()),
        "first_bad_index": _first_index(x <= 0 if call.packet is aten.rsqrt else x < 0),
        "cause": "sqrt",
    }


@explains(aten.div, aten.div_, causes=("zero_denominator",))
def _div(call: OpCall) -> dict[str, Any]:
    den = torch.as_tensor(call.args[1])
    zeros = int((den == 0).sum())
    return {"zero_denominators": zeros, "first_bad_index": _first_index(den == 0)} | _caused(
        "zero_denominator", zeros > 0
    )


@explains(
    aten.addcdiv,
    aten.addcdiv_,
    aten._foreach_addcdiv,
    aten._foreach_addcdiv_,
    causes=("zero_denominator",),
)
def _addcdiv(call: OpCall) -> dict[str, Any]:
    """x + v * a / b: Adam's update, whose denominator is sqrt(exp_avg_sq) + eps."""
    dens = call.args[2] if len(call.args) > 2 else call.kwargs.get("tensor2")
    dens = dens if isinstance(dens, list | tuple) else [dens]
    zeros = sum(int((d == 0).sum()) for d in dens if isinstance(d, torch.Tensor))
    return {"zero_denominators": zeros} | _caused("zero_denominator", zeros > 0)


@explains(aten.std, aten.var, aten.std_mean, aten.var_mean, causes=("no_degrees_of_freedom",))
def _spread(call: OpCall) -> dict[str, Any]:
    """std/var with correction 1 over one element divides by zero degrees of freedom."""
    x = call.args[0]
    dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    reduced = math.prod(x.shape[d] for d in dims) if dims else x.numel()
    correction = call.kwargs.get("correction", 1)
    return {"elements_reduced": int(reduced), "correction": correction} | _caused(
        "no_degrees_of_freedom", reduced - correction <= 0
    )


@explains(aten._to_copy, aten.copy_, causes=("narrowing_cast",))
def _cast(call: OpCall) -> dict[str, Any]:
    """A narrowing cast: values beyond the target dtype's range become Inf."""
    source = call.args[1] if call.packet is aten.copy_ else call.args[0]
    target = call.out.dtype if isinstance(call.out, torch.Tensor) else None
    info = torch.finfo(target) if target is not None and target.is_floating_point else None
    peak = summarize(source).max_abs
    return {
        "from_dtype": str(source.dtype).replace("torch.", ""),
        "to_dtype": str(target).replace("torch.", ""),
        "dtype_max": info.max if info else None,
        "largest_input": peak,
    } | _caused("narrowing_cast", info is not None and peak > info.max)


@explains(
    aten.exp, aten.pow, aten.mul, aten.addmm, aten.mm, aten.bmm, aten.matmul, causes=("overflow",)
)
def _overflow(call: OpCall) -> dict[str, Any]:
    peaks = [summarize(t).max_abs for t in float_tensors(call.args)]
    out = call.out if isinstance(call.out, torch.Tensor) else None
    limit = torch.finfo(out.dtype).max if out is not None else None
    return {"largest_input": max(peaks, default=math.nan), "dtype_max": limit} | _caused(
        "overflow", limit is not None
    )


@explains(aten.linalg_vector_norm, aten.norm, aten._foreach_norm, causes=("norm_overflow",))
def _norm(call: OpCall) -> dict[str, Any]:
    tensors = float_tensors(call.args[0])
    peak = max((summarize(t).max_abs for t in tensors), default=math.nan)
    limit = math.sqrt(torch.finfo(torch.float32).max)
    return {"largest_input": peak, "square_limit": limit, "cause": "norm_overflow"}


@explains(
    aten.native_layer_norm,
    aten.native_group_norm,
    aten.native_batch_norm,
    causes=("variance_overflow",),
)
def _normalisation(call: OpCall) -> dict[str, Any]:
    """A normalisation squares its (finite) inputs: past sqrt(dtype max) the variance is Inf."""
    x = call.args[0].detach()
    peak, limit = summarize(x).max_abs, math.sqrt(torch.finfo(x.dtype).max)
    return {
        "largest_input": peak,
        "variance_limit": limit,
        "dtype": str(x.dtype).replace("torch.", ""),
    } | _caused("variance_overflow", peak > limit)


@explains(aten._softmax, aten._log_softmax)
def _masked_rows(call: OpCall) -> dict[str, Any]:
    """Rows of a softmax input that are -inf everywhere: every key masked."""
    x, dim = call.args[0].detach(), call.args[1]
    return {
        "rows_all_neg_inf": int((x == -torch.inf).all(dim=dim).sum()),
        "rows": x.numel() // max(x.shape[dim], 1),
    }

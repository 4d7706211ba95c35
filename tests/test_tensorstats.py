"""Statistics that cannot overflow: a finite tensor never reports a non-finite statistic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from energydiag.analyses.checkpoint_stats import tensor_stats
from energydiag.engine.tensorstats import exact_global_norm, summarize

FP32_MAX = float(np.finfo(np.float32).max)
finite32 = st.floats(-FP32_MAX, FP32_MAX, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite32))
def test_finite_tensors_have_finite_statistics(values):
    t = torch.from_numpy(values)
    s = summarize(t, chunk=64)  # several chunks, so the merge is exercised too
    stats = tensor_stats("model.layer.weight", t)
    for value in (s.min, s.max, s.mean, s.std, s.l2, s.rms, s.max_abs, stats.l2, stats.std):
        assert math.isfinite(value)
    assert exact_global_norm([t, t]) == pytest.approx(math.sqrt(2) * s.l2, rel=1e-6)
    exact = values.astype(np.float64)
    # accurate relative to the largest value (float32 sums are cascaded; they still cancel)
    assert s.mean == pytest.approx(exact.mean(), abs=1e-6 * s.max_abs)
    # float64 squares of float32 values cannot overflow: numpy's norm is the reference
    assert s.l2 == pytest.approx(float(np.linalg.norm(exact)), rel=1e-5, abs=1e-6 * s.max_abs)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(2, 200), elements=st.floats(-1e6, 1e6, width=32)))
def test_std_matches_float64_reference(values):
    s = summarize(torch.from_numpy(values), chunk=17)  # many chunks: Chan's merge at work
    expected = values.astype(np.float64).std(ddof=1)
    assert s.std == pytest.approx(expected, rel=1e-5, abs=1e-6 * max(s.max_abs, 1e-30))


def test_counts_and_all_nan():
    t = torch.tensor([1.0, math.inf, -2.0, math.nan, -math.inf])
    s = summarize(t)
    assert (s.nan, s.posinf, s.neginf, s.finite_count) == (1, 1, 1, 2)
    assert (s.min, s.max) == (-2.0, 1.0)
    nothing = summarize(torch.full((4,), math.nan))
    assert all(math.isnan(v) for v in (nothing.min, nothing.max, nothing.mean, nothing.std))


def test_exploded_values_keep_their_size_and_the_overflow_is_a_fact():
    t = torch.full((1000,), 1e28)
    s = summarize(t)
    assert s.l2 == pytest.approx(1e28 * math.sqrt(1000), rel=1e-6)
    assert s.square_overflows_fp32
    assert math.isinf(float(torch.linalg.vector_norm(t)))  # what float32 itself would say


def test_float64_beyond_float64_squares():
    s = summarize(torch.tensor([1e300, -1e300], dtype=torch.float64))
    assert s.l2 == pytest.approx(math.sqrt(2) * 1e300) and s.std == pytest.approx(
        math.sqrt(2) * 1e300
    )


def test_tensors_in_walks_an_ops_arguments_in_pytree_order():
    """The instrument's hand-rolled walk must see what pytree sees, in the same order: the
    fingerprints pair inputs by position."""
    from torch.utils._pytree import tree_leaves

    from energydiag.engine.tensorstats import tensors_in

    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    args = ((a, [b, (c, 1.5)], None, "x"), {"alpha": 2, "out": d, "more": [a]})
    expected = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    assert [id(t) for t in tensors_in(args)] == [id(t) for t in expected]
    assert len(expected) == 5

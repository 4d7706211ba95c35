"""The per-op fingerprint's reductions, which `diff` and the numerics baseline compare: chunked
on the CPU (one float64 chunk alive at a time), they must still be float64-accurate, see every
element, and not depend on the thread count (`--against threads=K` compares exactly that)."""

from __future__ import annotations

import pytest
import torch

from energydiag.engine.fingerprint import Fingerprints
from energydiag.engine.instrument import AFTER_BACKWARD, BACKWARD, FORWARD, OPTIMIZER, Instrument
from energydiag.engine.module_prints import ModulePrints
from energydiag.engine.reductions import CHUNK, ROW, ROWS, WORDS, Reductions, checksum, reduce64

PHASES = (FORWARD, BACKWARD, AFTER_BACKWARD, OPTIMIZER)  # as the instrument names them

SHAPES = [(), (5,), (3 * CHUNK + 17,), (700, 300)]


def tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    made = [torch.randn(shape) * 3 + 1 for shape in SHAPES]
    return [*made, made[-1].t(), made[2].half()]  # a transposed view; float16


@pytest.mark.parametrize("t", tensors(), ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_chunked_reductions_are_float64_accurate(t):
    exact = t.double()
    norm, total = reduce64(t)
    assert (norm, total) == reduce64(t, torch.empty(CHUNK, dtype=torch.float64))
    assert norm.dtype == total.dtype == torch.float64
    assert norm.item() == pytest.approx(exact.norm().item(), rel=1e-13)
    assert total.item() == pytest.approx(exact.sum().item(), rel=1e-12, abs=1e-9)


def test_one_ulp_in_one_element_of_a_late_chunk_moves_the_sum_and_the_checksum():
    t = torch.randn(3 * CHUNK + 17)
    moved = t.clone()
    moved[2 * CHUNK + 5] = torch.nextafter(moved[2 * CHUNK + 5], torch.tensor(float("inf")))
    assert reduce64(moved)[1].item() != reduce64(t)[1].item()
    assert checksum(moved).item() != checksum(t).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_checksum_in_chunks_is_the_whole_tensors(dtype):
    """int64 sums wrap the same in any grouping: bitwise baselines keep their meaning. Widening
    float64 words to int64 is no copy, so the checksum must not weight them in place."""
    t = torch.randn(2 * CHUNK + 3, dtype=dtype)
    kept = t.clone()
    words = t.view(WORDS[t.element_size()]).to(torch.int64)
    whole = (words * torch.arange(1, 2 * words.numel(), 2)).sum()
    scratch = torch.empty(CHUNK, dtype=torch.float64)
    assert checksum(t).item() == checksum(t, scratch).item() == whole.item()
    assert torch.equal(t, kept)
    swapped = t.clone()
    swapped[[0, CHUNK + 1]] = t[[CHUNK + 1, 0]]
    assert checksum(swapped).item() != whole.item()  # a permutation changes it


def mixed() -> list[torch.Tensor]:
    """Small tensors enough to fill more than one block of rows, between large ones."""
    torch.manual_seed(1)
    small = [torch.randn(n % ROW + 1) * 2 - 1 for n in range(0, 37 * (ROWS + 3), 37)]
    made = [*small[:10], torch.randn(3 * CHUNK + 1), *small[10:], torch.randn(ROW + 1)]
    return [*made, torch.randn(ROW).half(), torch.randn(4, 8).t()]  # float16; a transposed view


def read(tensors: list[torch.Tensor], bitwise: bool = False) -> tuple[list, list]:
    reductions = Reductions(bitwise)
    assert [reductions.add(t) for t in tensors] == list(range(len(tensors)))
    return reductions.read()


def test_small_tensors_reduced_in_rows_are_float64_accurate_and_keep_their_slots():
    tensors = mixed()
    values, bits = read(tensors, bitwise=True)
    assert len(values) == len(bits) == len(tensors) and bits == [checksum(t) for t in tensors]
    for t, (norm, total) in zip(tensors, values, strict=True):
        exact = t.double()
        assert norm == pytest.approx(exact.norm().item(), rel=1e-13)
        assert total == pytest.approx(exact.sum().item(), rel=1e-12, abs=1e-12)
    assert read(tensors)[0] == values  # the float fingerprints do not depend on --bitwise


def test_one_ulp_in_a_small_tensor_moves_its_sum_and_no_other_slot():
    tensors = mixed()
    moved = [t.clone() for t in tensors]
    moved[ROWS + 2][3] = torch.nextafter(moved[ROWS + 2][3], torch.tensor(float("inf")))
    before, after = read(tensors)[0], read(moved)[0]
    apart = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert apart == [ROWS + 2] and before[ROWS + 2][1] != after[ROWS + 2][1]


def test_the_reductions_do_not_depend_on_the_thread_count():
    tensors = [torch.randn(4 * CHUNK + 1), *mixed()]
    before = torch.get_num_threads()
    try:
        seen = set()
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            seen.add(str(read(tensors)))
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1


def fingerprinted(step) -> Fingerprints:
    prints = Fingerprints(torch.nn.Linear(1, 1))
    with Instrument([prints]).attached():
        step()
    return prints


def test_a_copy_carries_its_inputs_fingerprint_and_a_slice_at_the_same_address_does_not():
    """``clone`` of a whole tensor is its input again: no second reduction. A slice that starts
    where its base does has the base's data pointer (so the base's slot), and its clone is
    fingerprinted on its own elements."""
    a, b = torch.randn(64, 32), torch.randn(32, 48)
    prints = fingerprinted(lambda: [(y := a @ b).clone(), y[:2].clone(), y.double()])
    (mm, whole, part, widened), values = prints.prints(), prints.reductions.read()[0]
    assert (whole.op, part.op, widened.op) == ("aten::clone", "aten::clone", "aten::_to_copy")
    assert prints.entries[1][1] == prints.entries[0][1]  # the same slot: reduced once
    assert whole.outputs == mm.outputs and len(values) == 5  # a, b, mm, the slice, the double
    assert part.outputs[0][0] == pytest.approx((a @ b)[:2].double().norm().item(), rel=1e-12)
    assert widened.outputs[0][0] == pytest.approx(mm.outputs[0][0], rel=1e-12)


def test_what_an_in_place_op_wrote_is_known_to_the_ops_that_read_it():
    """The version of an in-place op's output is bumped after the dispatch mode saw it: keyed by
    the version it had then, every reader would reduce it again as a leaf."""
    x = torch.randn(8, 8)
    prints = fingerprinted(lambda: (x.mul_(2), x.add_(1), x * 3))
    (_, mul_out, _), (_, add_out, add_in), (_, _, times_in) = prints.entries
    assert add_in[0] == mul_out[0] and times_in[0] == add_out[0]
    assert len(prints.reductions.where) == 4  # x, then what mul_, add_ and x * 3 wrote


def test_the_clips_in_place_scaling_of_every_gradient_is_fingerprinted():
    """``clip_grad_norm_`` scales the gradients with ``_foreach_mul_``, which returns nothing:
    what it wrote are its outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model(torch.randn(16, 4)).square().sum().backward()
    prints = Fingerprints(model)
    with Instrument([prints]).attached(model=model):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3, foreach=True)
    scaled = [e for e in prints.prints() if e.op == "aten::_foreach_mul_"]
    assert len(scaled) == 1 and len(scaled[0].outputs) == 4
    for (norm, total), p in zip(scaled[0].outputs, model.parameters(), strict=True):
        exact = p.grad.double()
        assert (norm, total) == pytest.approx((exact.norm().item(), exact.sum().item()))


def test_fingerprints_of_some_phases_are_the_whole_steps_in_those_phases():
    """`diff` names an op by fingerprinting only the phase where its watch saw the sides part:
    those entries must be the ones a whole step's fingerprints hold there, keys (occurrences
    counted within the phase) and values alike, as a plain loop runs them side by side."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    whole = Fingerprints(model)
    parts = {phase: Fingerprints(model, phases=frozenset({phase})) for phase in PHASES}
    with Instrument([whole, *parts.values()]).attached(optimizer, model):
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
    everything = whole.prints()
    for phase, part in parts.items():
        expected = [(e.key, e.outputs, e.inputs) for e in everything if e.phase == phase]
        assert expected and [(e.key, e.outputs, e.inputs) for e in part.prints()] == expected


def test_an_in_place_op_reads_a_leaf_as_it_was_before_it_wrote():
    """A leaf first seen by an in-place op (Adam's moments are) is reduced before the op runs:
    reduced after, its input would read as what the op wrote."""
    x = torch.full((4,), 2.0)
    (entry,) = fingerprinted(lambda: x.mul_(3)).prints()
    assert entry.inputs == [[4.0, 8.0]] and entry.outputs == [[12.0, 24.0]]


def watched_step(compiled: bool) -> tuple[list, int]:
    """A hand-written step of a small MLP under module hooks; the entries, and how many tensors
    were reduced."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prints = ModulePrints(model, compiled=compiled)
    loss = model(torch.randn(16, 6)).square().mean()
    loss.backward()
    optimizer.step()
    entries = prints.prints(loss.item(), optimizer)
    prints.detach()
    reduced = len(prints.reducer.slots.reductions.numels) if not compiled else 0
    return [(e.key, e.outputs, e.inputs) for e in entries], reduced


def test_the_eager_watch_reduces_a_tensor_once_and_agrees_with_the_traced_one():
    """Each module's input is the output before it (the Sequential's, the first Linear's): the
    eager watch reduces x, three outputs, four gradients and 4 x 3 tensors the step left (each
    parameter, Adam's two moments; the step counts too), and its values are the traced watch's
    to float64 rounding."""
    eager, reduced = watched_step(compiled=False)
    traced, _ = watched_step(compiled=True)
    assert [key for key, _, _ in eager] == [key for key, _, _ in traced]
    assert reduced == 1 + 3 + 4 + 4 * 4
    flat = [[v for pair in [*outs, *ins] for v in pair] for _, outs, ins in eager]
    assert flat == [
        pytest.approx([v for p in [*o, *i] for v in p], rel=1e-12) for _, o, i in traced
    ]

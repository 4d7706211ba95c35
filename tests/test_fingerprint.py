"""The per-op fingerprint's reductions, which `diff` and the numerics baseline compare: chunked
on the CPU (one float64 chunk alive at a time), they must still be float64-accurate, see every
element, and not depend on the thread count (`--against threads=K` compares exactly that)."""

from __future__ import annotations

import pytest
import torch

from energydiag.engine.fingerprint import CHUNK, WORDS, checksum, reduce64

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


def test_the_reductions_do_not_depend_on_the_thread_count():
    t = torch.randn(4 * CHUNK + 1)
    before = torch.get_num_threads()
    try:
        seen = set()
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            seen.add(tuple(v.item() for v in reduce64(t)))
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1

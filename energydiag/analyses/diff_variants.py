"""What side B of a `diff` changes, and the tolerance that change allows.

A variant is applied around each of side B's steps (threads, deterministic kernels, inductor's
random ops) or once to its session (a device, a dtype, autocast, ``torch.compile``); ``ranks``
plays side B on other processes (``analyses/diff_ranks.py``). Under ``compile`` the per-op
instrument cannot watch: a dispatch mode makes dynamo run eager, so both sides are then
fingerprinted at module outputs and gradients instead (``engine/module_prints.py``); across
ranks, whose forwards see shards, by the gradients the step leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from energydiag.engine.environment import deterministic_algorithms
from energydiag.engine.module_prints import ModulePrints
from energydiag.engine.session import Session, open_session
from energydiag.engine.step import AUTOCAST_DTYPES
from energydiag.errors import OptionError
from energydiag.io.rundir import Run

DTYPES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
TOLERANCE_EPS = 2.0  # across a dtype change: outputs within 2 eps of the coarser dtype agree
# Compiled kernels, and another device's, fuse and reorder float32 sums. On the reference model
# inductor's module outputs stay within 0.5 eps of eager and its gradients within 7.3 eps;
# 16 eps (1.9e-6) is the allowance, and a larger gap is then judged by the float64 re-run.
KERNEL_EPS = 16.0
# Across ranks, all gradients together: a 2-rank DDP step against one process on the same global
# batch (gathered negatives, no dropout) was 1.4e-6 to 3.4e-6 apart over 3 seeds and 2 steps of
# the reference model, and a loss whose negatives stay on each rank 0.4 apart. 1e-4 is the
# allowance for reordering, calibrated there: a semantic change smaller than it reads as noise.
RANKS_GAP = 1e-4


@dataclass
class Variant:
    """What side B changes: ``threads=K``, ``dtype=D`` (parameters, optimizer state and inputs
    cast), ``autocast=D`` (the forward under autocast, as a mixed-precision run has it),
    ``deterministic=off`` (torch's default kernels against side A's deterministic ones),
    ``compile=BACKEND`` (the model under ``torch.compile``), ``device=D`` (side B replayed on
    another device) or ``ranks=W`` (side B's step on W DDP processes, a shard of the batch
    each)."""

    spec: str
    threads: int | None = None
    dtype: torch.dtype | None = None
    autocast: str | None = None
    deterministic: bool | None = None  # None: as the process has it
    compile: str | None = None  # a torch.compile backend
    device: str | None = None  # side B's device, when not side A's
    # What is fingerprinted: "op" (every op), "module" (module outputs and gradients, under
    # torch.compile) or "gradient" (the gradients a step leaves, where ranks see shards)
    watch: str = "op"
    ranks: int | None = None  # side B's step on this many DDP processes
    # Watched by module where both sides run eager (`diff`'s watch before it names an op): the
    # hooks keep one store, so a tensor seen again keeps its slot, and the parameters and
    # optimizer state the step leaves are watched too. Under torch.compile neither: hooks are
    # traced, and Adam turns the kernels' rounding of a zero gradient into a real move.
    eager_watch: bool = False

    def baseline(self) -> Variant:
        """Side A: the replay as it is, watched the way side B is; with deterministic kernels
        when B turns them off."""
        deterministic = True if self.deterministic is False else None
        return Variant("", deterministic=deterministic, watch=self.watch)

    @property
    def tolerance(self) -> float:
        """Relative difference below which two fingerprints agree: 0 (bit for bit) within one
        dtype, ``TOLERANCE_EPS`` epsilons of the coarser one across a change, ``KERNEL_EPS``
        float32 epsilons between compiled and eager kernels or two devices' kernels."""
        if self.compile or self.device:
            return KERNEL_EPS * torch.finfo(torch.float32).eps
        changed = self.dtype or (AUTOCAST_DTYPES[self.autocast] if self.autocast else None)
        if changed is None or torch.finfo(changed).eps <= torch.finfo(torch.float32).eps:
            return 0.0
        return TOLERANCE_EPS * torch.finfo(changed).eps

    @property
    def noise_bound(self) -> float | None:
        """Across ranks a gradient is an average of shards' with no op to re-run in float64:
        the gradients together apart by no more than ``RANKS_GAP`` are reordering."""
        return RANKS_GAP if self.ranks else None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        kept = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with contextlib.ExitStack() as stack:
                if self.deterministic is not None:
                    stack.enter_context(deterministic_algorithms(self.deterministic))
                if self.compile:
                    stack.enter_context(_eager_random())
                yield
        finally:
            torch.set_num_threads(kept)


def _eager_random() -> contextlib.AbstractContextManager:
    """Inductor draws its own random numbers unless told to call eager's generator: without
    this every dropout mask differs by design, and nothing else can be compared."""
    import torch._inductor.config as inductor

    return inductor.patch(fallback_random=True)


def parse_variant(spec: str) -> Variant:
    name, _, value = spec.partition("=")
    if name == "threads" and value.isdigit() and int(value) > 0:
        return Variant(spec, threads=int(value))
    if name == "dtype" and value in DTYPES:
        return Variant(spec, dtype=DTYPES[value])
    if name == "autocast" and DTYPES.get(value) in (torch.bfloat16, torch.float16):
        return Variant(spec, autocast=str(DTYPES[value]).replace("torch.", ""))
    if name == "deterministic" and value == "off":
        return Variant(spec, deterministic=False)
    if name == "compile":
        return Variant(spec, compile=_backend(value or "inductor", spec), watch="module")
    if name == "ranks" and value.isdigit() and int(value) > 1:
        return Variant(spec, ranks=int(value), watch="gradient")
    if name == "device" and (value in ("cpu", "cuda") or _cuda_index(value)):
        return Variant(spec, device=_available(value, spec))
    raise OptionError(
        "use threads=K, dtype=float64|float32|bfloat16|float16, autocast=bf16|fp16, "
        "deterministic=off, compile[=BACKEND], device=cpu|cuda|cuda:N or ranks=W (W > 1)",
        "against",
        value=repr(spec),
    )


def _cuda_index(name: str) -> bool:
    return name.startswith("cuda:") and name[5:].isdigit()


def _available(name: str, spec: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("CUDA is not available on this machine", "against", value=repr(spec))
    return name


def _backend(name: str, spec: str) -> str:
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if name not in known:
        raise OptionError(
            f"torch.compile has no backend {name!r} here (try inductor, aot_eager or eager)",
            "against",
            value=repr(spec),
        )
    return name


def side_session(
    run: Run, step: int, device: torch.device, variant: Variant, keep: str | None = None
) -> tuple[Session, ModulePrints | None]:
    """A session at the start of ``step`` under ``variant``: the checkpoint at or before it,
    then the steps between replayed as recorded (compiled too, under ``compile``). Watched by
    module, its hooks go on before anything is compiled: dynamo does not recompile a graph
    for hooks added to the modules it inlined, so hooks added later would never fire."""
    session = open_session(run, step, torch.device(variant.device) if variant.device else device)
    if variant.dtype is not None:
        session.set_precision(variant.dtype)
    if variant.autocast is not None:
        session.autocast_dtype = variant.autocast
    watched = variant.watch == "module"
    prints = ModulePrints(session.model, keep, not variant.eager_watch) if watched else None
    if variant.compile is not None:
        session.model.compile(backend=variant.compile)
    with variant.applied():
        for earlier in range(session.step, step):
            session.train(run.batch(earlier))
    return session, prints

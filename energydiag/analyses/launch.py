"""Starting one process per rank on this machine, through torchrun's own launcher.

The processes see the environment torchrun gives (RANK, WORLD_SIZE, MASTER_ADDR...), so a worker
is the same code a user's torchrun would start. A rank that fails is one line naming it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from energydiag.errors import DiagError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TIMEOUT = timedelta(minutes=5)  # a rank that died leaves the others waiting at most this long


def launch(nproc: int, worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """``worker(*args)`` on ``nproc`` local processes; each rank's return value. The processes
    are forked from multiprocessing's fork server, a fresh process that has imported torch and
    the worker's module (it runs no op: no thread pool or CUDA context is forked) and stays up,
    so a process that launches more than once imports them once."""
    import multiprocessing

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    multiprocessing.set_forkserver_preload(["torch", worker.__module__])

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="forkserver",
    )
    # All ranks are on this machine: gloo over loopback, whatever interface the hostname names.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    quiet = logging.getLogger("torch.distributed.elastic")
    level, quiet.level = quiet.level, logging.CRITICAL  # a rank's failure is reported below
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        return elastic_launch(config, worker)(*args)
    except ChildFailedError as err:
        raise DiagError(None, _first_failure(err)) from None
    finally:
        quiet.setLevel(level)
        for sig, handler in handlers.items():  # the launcher leaves its own handlers installed
            signal.signal(sig, handler)


@contextlib.contextmanager
def process_group(backend: str) -> Iterator[None]:
    """A worker's process group, from torchrun's environment. The worker's DDP/FSDP objects
    are freed before the group is destroyed: one freed after its group can wait forever."""
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()


def _first_failure(err: ChildFailedError) -> str:
    rank, failure = min(err.failures.items())
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return f"replay rank {rank} failed: " + (text.removeprefix("DiagError: ") or "no message")

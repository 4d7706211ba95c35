"""One rank raised: every rank keeps its evidence.

An exception on one rank leaves the others waiting in their next collective, where a health
vote cannot reach them. The process group's key-value store can: the failing rank sets a key,
a watcher thread on every other rank (blocked on that key, not on the training loop) dumps that
rank's ring and answers, and the failing rank waits for the answers at most ``timeout``
seconds, so one hung rank does not hang the dump of the others.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

WATCH = timedelta(days=365)  # a watcher waits for the whole run
JOIN = 10.0  # seconds a closing rank waits for its watcher (which may be dumping the ring)
CLOSED = b"closed"
_RECORDERS = itertools.count()  # created in the same order on every rank: the same keys


class PeerAlarm:
    """The failing rank's ``tell``; ``on_raised(message)`` runs on every other rank."""

    def __init__(self, rank: int, world: int, on_raised: Callable[[dict[str, Any]], None]):
        self.rank, self.world, self.on_raised = rank, world, on_raised
        self.prefix = f"energydiag/recorder-{next(_RECORDERS)}"
        self.store = _own_client()
        # The watcher's wait occupies a connection: it gets its own, never the training loop's.
        self.watcher = _own_client()
        self.thread = threading.Thread(target=self._watch, name="energydiag-peers", daemon=True)
        self.thread.start()

    def tell(self, message: dict[str, Any], timeout: float) -> list[int]:
        """Tell every other rank; the ranks that did not answer within ``timeout`` seconds."""
        others = [r for r in range(self.world) if r != self.rank]
        for rank in others:
            self.store.set(self._key(rank), json.dumps({"rank": self.rank, **message}))
        deadline = time.monotonic() + timeout  # one for all: a hung rank costs ``timeout`` once
        silent = []
        for rank in others:
            left = timedelta(seconds=max(deadline - time.monotonic(), 0.01))
            try:
                self.store.wait([f"{self.prefix}/dumped/{rank}"], left)
            except RuntimeError:  # DistStoreError: no answer in time
                silent.append(rank)
        return silent

    def close(self) -> None:
        """Wake this rank's watcher and let it end (a failing peer may have woken it first).
        A process that exits while the watcher is still inside the store's C++ client aborts
        ("terminate called without an active exception"), so the thread is joined."""
        with contextlib.suppress(RuntimeError):  # the group, and its store, may be gone
            self.store.set(self._key(self.rank), CLOSED)
        if threading.current_thread() is not self.thread:  # a dump the watcher runs may close
            self.thread.join(JOIN)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/raised/{rank}"

    def _watch(self) -> None:
        try:  # one long wait on this rank's own key: no polling, nothing logged while it waits
            self.watcher.wait([self._key(self.rank)], WATCH)
            message = self.watcher.get(self._key(self.rank))
        except RuntimeError:  # the store went away with the process group: nothing to watch
            return
        if message == CLOSED:
            return
        self.on_raised(json.loads(message))
        self.store.set(f"{self.prefix}/dumped/{self.rank}", "1")


def available() -> bool:
    """Peers can be told where the process group's store is a TCPStore (torchrun, env://)."""
    return _tcp_store() is not None


def _tcp_store() -> dist.TCPStore | None:
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore around the TCPStore
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


def _own_client() -> dist.TCPStore:
    """A new connection to the group's TCPStore, shared with no one."""
    store = _tcp_store()
    return dist.TCPStore(store.host, store.port, is_master=False, timeout=WATCH)

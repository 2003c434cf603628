"""Group commit: one writer thread turns many concurrent writes into few DuckDB transactions.

Owns: the write queue, the writer thread and how writes are grouped. What a write does in SQL
belongs to the store (``Store._apply_group``).

Invariants:
- A write is acknowledged (``submit`` returns) only after the transaction holding it has
  committed, so an acknowledged write survives a crash of the process (DuckDB syncs its WAL on
  commit). A write that fails gets its own exception; it never fails the others of its group
  (a failed group is retried one write per transaction).
- No artificial delay: the writer commits whatever is queued when it is free, so a lone write
  commits at once and a burst shares one commit (the classic group commit).
- After ``close`` nothing is accepted; what was queued before is still committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class WriterClosed(RuntimeError):
    """The store is closing; the write was not accepted."""


class GroupWriter:
    def __init__(self, apply_group: Callable[[Sequence[Any]], list[Any]], max_group: int = 1024,
                 name: str = "chatloop-writer"):
        self._apply_group = apply_group
        self._max_group = max_group
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.groups = 0  # commits so far (for benchmarks and tests)
        self.writes = 0

    def submit(self, op: Any, timeout: float | None = 60) -> Any:
        """Queue ``op``; return its result once its group has committed (or raise its error)."""
        if self._closed.is_set():
            raise WriterClosed("the store is closed")
        fut: Future = Future()
        self._queue.put((op, fut))
        return fut.result(timeout)

    def close(self, timeout: float = 30) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            group = [item]
            while len(group) < self._max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            self._commit(group)

    def _commit(self, group: list[tuple[Any, Future]]) -> None:
        try:
            results = self._apply_group([op for op, _ in group])
        except BaseException as exc:  # the store could not even try: every write hears why
            results = [exc] * len(group)
        self.groups += 1
        self.writes += len(group)
        for (_, fut), res in zip(group, results):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

"""``IndexEvents``: a disk index's inserts and removals, queued in order for a lookup server.

The index adds ``("insert" | "remove", key)`` under its lock while tracking
is on; ``drain`` hands them over in order (``lookup_events`` delivers them).
The chunks recovered at open are queued as one batch whose keys are made
only when drained, so an index that no one drains before turning tracking
off (the vLLM scheduler) never makes them. Invariant: a drain gives every
event queued before it, once, in the order queued.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..key import CacheEngineKey

__all__ = ["IndexEvents"]


class IndexEvents:
    """The event queue of one index; ``on``: track from the start."""

    def __init__(self, on: bool):
        self.on = on
        self._q: deque = deque()

    def add(self, op: str, key: CacheEngineKey) -> None:
        if self.on:
            self._q.append((op, key))

    def add_inserts(self, keys: Callable[[], list[CacheEngineKey]]) -> None:
        """Inserts of the keys ``keys()`` gives, made when drained."""
        if self.on:
            self._q.append(("inserts", keys))

    def track(self, on: bool) -> None:
        """Start (or stop, dropping what is queued) tracking."""
        self.on = on
        if not on:
            self._q.clear()

    def __bool__(self) -> bool:
        return bool(self._q)

    def drain(self) -> list[tuple[str, CacheEngineKey]]:
        """Everything queued since the last call, in order."""
        out: list[tuple[str, CacheEngineKey]] = []
        while True:
            try:
                ev = self._q.popleft()
            except IndexError:
                return out
            if ev[0] == "inserts":
                out.extend(("insert", k) for k in ev[1]())
            else:
                out.append(ev)

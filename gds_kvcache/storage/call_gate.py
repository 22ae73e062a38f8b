"""``CallGate``: a tier's lifetime, the calls and puts it has in flight.

Every public call of the disk tier runs between ``enter`` and ``exit``; a
background put holds one more entry from submission until its future is
settled and is counted as a put in flight. Invariants: once ``close`` begins
no call enters (``ClosedError``), and ``close`` returns only when every call
and put in flight has left; each finished put bumps a generation, which is
what the storage manager's store back-pressure waits on.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Optional

from ..errors import ClosedError

__all__ = ["CallGate"]


class CallGate:
    """Counts calls and puts in flight; ``name`` appears in the ``ClosedError`` of a late call."""

    def __init__(self, name: str):
        self._name = name
        self._cond = threading.Condition()
        self._ops = 0
        self._puts_in_flight = 0
        self._put_generation = 0
        self._closing = False

    def enter(self, n: int = 1) -> None:
        """Count ``n`` calls in; raises ``ClosedError`` once closing began."""
        with self._cond:
            if self._closing:
                raise ClosedError(f"{self._name} is closed")
            self._ops += n

    def exit(self, n: int = 1) -> None:
        with self._cond:
            self._ops -= n
            # Only ``close`` waits for no call in flight, and it sets ``_closing`` under this lock
            # before it waits: a notify before then would wake nobody (a get's hot path skips it).
            if self._ops == 0 and self._closing:
                self._cond.notify_all()

    def put_started(self) -> None:
        """A background put was handed to the writer pool (inside an ``enter``): it holds one
        more entry (released by its ``exit``) and counts as a put in flight."""
        with self._cond:
            self._ops += 1
            self._puts_in_flight += 1

    def put_finished(self) -> None:
        """The put's bytes and index record are done (its slab room is free again)."""
        with self._cond:
            self._puts_in_flight -= 1
            self._put_generation += 1
            self._cond.notify_all()

    def wait_for_puts(self, timeout: Optional[float] = None) -> bool:
        """Wait until no put is in flight; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._puts_in_flight == 0, timeout)

    def wait_for_put_progress(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until some put in flight finishes; False if none was in flight
        or none finished in time."""
        with self._cond:
            if self._puts_in_flight == 0:
                return False
            gen = self._put_generation
            return self._cond.wait_for(lambda: self._put_generation != gen, timeout)

    def submit(self, executor, fn, *args) -> Future:
        """Run ``fn(*args)`` on ``executor`` as a call in flight from now until it returns, so
        ``close`` waits for it (a prefetch); raises ``ClosedError`` once closing began."""
        self.enter()

        def job():
            try:
                return fn(*args)
            finally:
                self.exit()

        try:
            return executor.submit(job)
        except BaseException:
            self.exit()
            raise

    @property
    def closing(self) -> bool:
        """Whether ``close`` began (new calls are refused from then on)."""
        return self._closing

    def close(self) -> bool:
        """Refuse new calls and wait for those in flight; False (at once) if an earlier ``close``
        began: exactly one caller tears the tier down."""
        with self._cond:
            if self._closing:          # another close did it, or is doing it
                return False
            self._closing = True
            self._cond.wait_for(lambda: self._ops == 0)
            return True

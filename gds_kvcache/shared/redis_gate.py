"""``Gate``: a Redis that timed out is treated as down for a back-off period, probed off the callers' path.

Invariant: while the gate is down every gated call fails at once with a
``redis.ConnectionError`` (``RedisBackedOff``), so a caller waits for a
stalled Redis at most once per back-off period; only a background probe
talks to the server until it answers. A peer that answers something the
client cannot parse (not a Redis) fails the call as ``NotRedisError``, a
``redis.ConnectionError`` too: callers take their unreachable-Redis path.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Optional

__all__ = ["Gate", "gated"]

log = logging.getLogger(__name__)


class Gate:
    """Redis treated as down for ``backoff`` seconds after a timeout, and probed off the callers' path.

    While down, every call fails at once with ``RedisBackedOff`` (a
    ``redis.ConnectionError``: callers take their unreachable-Redis path) instead
    of waiting out its own socket timeout; a daemon thread pings the server every
    ``backoff`` seconds and opens the gate once it answers. So a request waits
    for a stalled Redis at most once per back-off period.
    """

    def __init__(self, client, backoff: float):
        import redis
        self.client = client
        self.backoff = backoff
        self.down_since: Optional[float] = None
        self.trips = 0
        self._lock = threading.Lock()
        self.timeouts = (redis.TimeoutError, TimeoutError)
        self.Down = _backed_off_class()

    def check(self) -> None:
        if self.down_since is not None:
            raise self.Down(f"Redis timed out {time.monotonic() - self.down_since:.1f} s ago; treated as down "
                            f"until a probe answers (every {self.backoff:g} s, redis_backoff)")

    def tripped(self) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.trips += 1
        log.warning("Redis timed out: treated as down, probed every %g s", self.backoff)
        threading.Thread(target=self._probe, name="gds-kvcache-redis-probe", daemon=True).start()

    def _probe(self) -> None:
        while True:
            time.sleep(self.backoff)
            try:
                self.client.ping()
            except Exception as e:  # noqa: BLE001 - still down: probe again later
                log.debug("Redis probe: %s", e)
                continue
            with self._lock:
                self.down_since = None
            log.warning("Redis answers again")
            return


_BACKED_OFF = []


def _backed_off_class():
    """``RedisBackedOff``, a ``redis.ConnectionError`` (made once ``redis`` is imported)."""
    if not _BACKED_OFF:
        import redis
        _BACKED_OFF.append(type("RedisBackedOff", (redis.ConnectionError,),
                                {"__doc__": "Redis is treated as down (a timeout less than redis_backoff ago)."}))
    return _BACKED_OFF[0]


def gated(fn):
    """Fail at once while the gate is down; a timeout puts it down."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        self._gate.check()
        try:
            return fn(self, *args, **kwargs)
        except self._gate.timeouts:
            self._gate.tripped()
            raise
        except (AttributeError, TypeError, IndexError, KeyError, UnicodeError) as e:
            # The client choking on what the peer said (a server answering +OK to everything,
            # a proxy of another protocol): not a usable Redis, the same path as a closed port.
            raise _not_redis_class()(f"the server at this URL does not answer as Redis does "
                                     f"({type(e).__name__}: {e})") from None
    return call


_NOT_REDIS = []


def _not_redis_class():
    """``NotRedisError``, a ``redis.ConnectionError`` (made once ``redis`` is imported)."""
    if not _NOT_REDIS:
        import redis
        _NOT_REDIS.append(type("NotRedisError", (redis.ConnectionError,),
                               {"__doc__": "The peer at the lookup URL is not a usable Redis."}))
    return _NOT_REDIS[0]

"""``FleetLookups``: the scheduler's lookups of other instances' chunks in Redis, and the leases they take.

vLLM asks the manager one offload key at a time. A key this instance does
not hold is answered ``RETRY`` the first time (vLLM's scanner goes on to the
next key on a RETRY, so a request's keys are all collected in one pass), and
``flush`` (from ``on_schedule_end``) leases every collected key of a request
in one Redis round trip (``SharedIndex.pin``, every tensor-parallel rank's
shard at once). The next step's lookups answer from what it found.

Invariants: a chunk is a hit only when every shard of it is leased from a
live writer run other than this instance (for MLA there is one shard, read
by every rank), and only in the request that leased it; its leases last
until that request's load ended (``load_done``) or the request finished
(``finished``), renewed at ``take`` when half their time is gone; a load
spec carries the lease end as its deadline, after which the worker trusts
nothing it read. Redis unreachable (or backed off) is a miss, never an error.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from ...key import CacheEngineKey
from ...shared.redis_index import redis_errors
from ...shared.shared_index import Pin, Pins, SharedIndex
from .fleet_specs import PoolRef

__all__ = ["FleetLookups"]

log = logging.getLogger(__name__)

#: Seconds kept off a lease's end for the hand-over to the worker and its checks.
LEASE_MARGIN_S = 0.25
#: A request's state is dropped once its leases ran out this many times over without a lookup.
_FORGET_AFTER = 4


@dataclass
class _Request:
    """One request's remote lookups: keys to ask, what was found (per shard a ``Pin``, or None)."""

    token: str
    asked: dict = field(default_factory=dict)         # okey -> None, insertion-ordered
    found: dict = field(default_factory=dict)         # okey -> list[Pin] | None
    held: set = field(default_factory=set)            # writer:generation pairs leased under token
    leased_at: float = 0.0                            # time.time() before the last acquire
    loading: int = 0                                  # load jobs of this request in flight
    touched: float = field(default_factory=time.monotonic)


class FleetLookups:
    """Lookups, leases and pool layouts of other instances' chunks for one scheduler.

    Parameters
    ----------
    index
        The shared index (leases, writer layouts).
    chunk_keys
        ``chunk_keys(okey)``: the chunk key of every shard of an offload key.
    own_writers
        This instance's writer ids (their chunks are local, never leased here).
    lease_ttl
        Seconds a lease lasts.
    stats
        Counters updated in place: ``remote_lookups`` (chunks asked),
        ``remote_hits``, ``remote_misses``, ``redis_errors``, ``lease_renewals``.
    """

    def __init__(self, index: SharedIndex, chunk_keys: Callable[[bytes], list[CacheEngineKey]],
                 own_writers: set[str], lease_ttl: float, stats: dict):
        self.index = index
        self.chunk_keys = chunk_keys
        self.own = own_writers
        self.lease_ttl = lease_ttl
        self.stats = stats
        self._errors = redis_errors()
        self._reqs: dict[str, _Request] = {}
        self._layouts: dict[tuple[str, str], Optional[PoolRef]] = {}   # (writer, boot) -> pool
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="gds-kvcache-fleet-release")

    # -- lookups -------------------------------------------------------------------------------
    def lookup(self, okey: bytes, req_id: str) -> Optional[bool]:
        """True (hit: leased), False (miss) or None (not asked yet: answered after the next ``flush``)."""
        r = self._reqs.get(req_id)
        if r is None:
            r = self._reqs[req_id] = _Request(self.index.redis.new_token(self.index.reader))
        r.touched = time.monotonic()
        if okey in r.found:
            return r.found[okey] is not None
        r.asked[okey] = None
        return None

    def flush(self) -> None:
        """Lease the keys each request asked since the last call: one Redis round trip per request."""
        for req_id, r in list(self._reqs.items()):
            if r.asked:
                keys, r.asked = list(r.asked), {}
                self._acquire(r, keys)
            elif not r.loading and time.monotonic() - r.touched > _FORGET_AFTER * self.lease_ttl:
                self._drop(req_id)        # a request vLLM never finished here (aborted while waiting)

    def _acquire(self, r: _Request, okeys: list, count: bool = True) -> None:
        n = len(okeys) if count else 0
        per = [self.chunk_keys(k) for k in okeys]
        shards = len(per[0]) if per else 1
        r.leased_at = time.time()
        try:
            pins = self.index.pin([ck for cks in per for ck in cks])
        except self._errors as e:
            self.stats["redis_errors"] += 1
            log.debug("remote lookup: Redis unreachable: %s", e)
            for k in okeys:
                r.found[k] = None
            self.stats["remote_misses"] += n
            return
        r.held.update(pins.held)
        self.stats["remote_lookups"] += n
        for i, k in enumerate(okeys):
            got = pins.pins[i * shards:(i + 1) * shards]
            ok = all(p is not None and not p.stale and p.writer not in self.own and self._pool(p) is not None
                     for p in got)
            r.found[k] = list(got) if ok else None
            if count:
                self.stats["remote_hits" if ok else "remote_misses"] += 1

    def _pool(self, p: Pin) -> Optional[PoolRef]:
        """The pool of ``p``'s writer run (one round trip the first time; None: unusable)."""
        key = (p.writer, p.boot)
        if key not in self._layouts:
            try:
                lay = self.index.layout(p.writer, p.boot)
            except self._errors as e:
                self.stats["redis_errors"] += 1
                log.debug("layout of %s: Redis unreachable: %s", p.writer, e)
                return None
            self._layouts[key] = None if lay is None else PoolRef(lay.path, lay.stripes, lay.stripe_bytes,
                                                                  lay.unit, p.boot, False)
        return self._layouts[key]

    # -- loads ---------------------------------------------------------------------------------
    def take(self, okeys: list, req_id: str) -> tuple[list[Optional[list[Pin]]], list[Optional[PoolRef]], float]:
        """For a load of ``okeys``: per key its pins (None: not leased here) and per pin its pool,
        and the time the leases end (renewed first, one round trip, when half their time is gone)."""
        r = self._reqs.get(req_id)
        if r is None:
            return [None] * len(okeys), [], 0.0
        r.loading += 1
        mine = [k for k in okeys if r.found.get(k)]
        if mine and time.time() - r.leased_at > self.lease_ttl / 2:
            self.stats["lease_renewals"] += 1
            self._acquire(r, mine, count=False)      # same token: extends the leases; entries gone since are misses
        pins = [r.found.get(k) for k in okeys]
        pools = [None if ps is None else [self._layouts.get((p.writer, p.boot)) for p in ps] for ps in pins]
        return pins, pools, r.leased_at + self.lease_ttl - LEASE_MARGIN_S

    def load_done(self, req_id: str) -> None:
        """A load of the request ended: its leases go (a later lookup of it leases anew)."""
        r = self._reqs.get(req_id)
        if r is not None:
            r.loading = max(0, r.loading - 1)
            if not r.loading:
                self._drop(req_id)

    def finished(self, req_id: str) -> None:
        """vLLM is done with the request: its leases go, unless a load of it is still in flight."""
        r = self._reqs.get(req_id)
        if r is not None and not r.loading:
            self._drop(req_id)

    def reset(self) -> None:
        """Forget every answer (the cache was reset): requests ask again."""
        for req_id, r in list(self._reqs.items()):
            if not r.loading:
                self._drop(req_id)

    def _drop(self, req_id: str) -> None:
        r = self._reqs.pop(req_id, None)
        if r is not None and r.held:
            # Off the scheduler's path (a round trip): until it lands, the owner just waits a little longer.
            self._releaser.submit(self._release, Pins(r.token, [], list(r.held)))

    def _release(self, pins: Pins) -> None:
        try:
            self.index.unpin(pins)
        except self._errors as e:    # the leases expire on their own
            self.stats["redis_errors"] += 1
            log.debug("lease release failed: %s", e)

    def close(self) -> None:
        """Release every lease and wait for the releases."""
        for req_id in list(self._reqs):
            self._drop(req_id)
        self._releaser.shutdown(wait=True)

"""``SharedIndex``: the index half of the shared tier, at the level of chunk keys.

Lookups over every writer and every tensor-parallel rank, put claims (the
shared tier's reservations) and pins (leases) with the chunk descriptors
they cover, and other writers' pool layouts. It needs no GPU, no slab and no
I/O engine, so a scheduler process can run it alone; the transfer half
(``storage.transfer.DiskTransfer`` over a ``PoolLayout``) moves the bytes.

Invariants: a lookup counts a chunk only when every rank's shard is
published; a pinned descriptor is usable only while its lease lasts and only
if it was published by its writer's current run (``Pin.stale`` otherwise);
every value read from Redis is validated (an unusable one is a miss).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import GdsKvCacheError
from ..key import CacheEngineKey
from ..storage.disk_index import DiskEntry
from ..storage.pool_file import LayoutError, PoolLayout
from .redis_index import RedisIndex

__all__ = ["Pin", "Pins", "SharedIndex"]

log = logging.getLogger(__name__)


@dataclass
class Pin:
    """One pinned chunk: its descriptor, the writer that holds it and that writer's run."""

    entry: DiskEntry
    writer: str
    boot: str
    stale: bool = False     # published by an earlier run of its writer: its bytes may be reused


@dataclass
class Pins:
    """The pins of one batch (``SharedIndex.pin``): per key a ``Pin`` or None, and what to unpin."""

    token: str
    pins: list
    held: list = field(default_factory=list)
    malformed: int = 0


class SharedIndex:
    """Keys -> published chunks of one shared directory, through Redis.

    Parameters
    ----------
    redis
        The Redis index of the shared directory's namespace.
    shared_dir
        The shared directory (writer layouts name paths below it).
    reader
        This process's id (names its lease tokens).
    """

    def __init__(self, redis: RedisIndex, shared_dir: str, reader: str):
        self.redis = redis
        self.shared_dir = shared_dir
        self.reader = reader

    @staticmethod
    def shards(key: CacheEngineKey) -> list[str]:
        """The key of every tensor-parallel rank's shard of ``key``'s chunk."""
        if key.world_size <= 1:
            return [key.to_string()]
        return [dataclasses.replace(key, worker_id=r).to_string() for r in range(key.world_size)]

    # -- lookups -----------------------------------------------------------------------------
    def prefix(self, keys: Sequence[CacheEngineKey]) -> int:
        """Hit prefix of ``keys`` over all writers and ranks (one round trip)."""
        return self.redis.prefix([self.shards(k) for k in keys]) if keys else 0

    def exists(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether every rank's shard is published (one round trip)."""
        return self.redis.exists([self.shards(k) for k in keys]) if keys else []

    # -- reservations: put claims --------------------------------------------------------------
    def claim(self, writer: str, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether ``writer`` may store it (no one published or claimed it)."""
        return self.redis.claim(writer, [k.to_string() for k in keys]) if keys else []

    def unclaim(self, writer: str, keys: Sequence[CacheEngineKey]) -> None:
        """Give back ``writer``'s claims on ``keys``."""
        if keys:
            self.redis.unclaim(writer, [k.to_string() for k in keys])

    # -- pins: leases ------------------------------------------------------------------------------
    def pin(self, keys: Sequence[CacheEngineKey]) -> Pins:
        """Lease the published chunk of each key (one round trip): per key a ``Pin`` or None."""
        out = Pins(self.redis.new_token(self.reader), [None] * len(keys))
        if not keys:
            return out
        pubs, out.held = self.redis.acquire(out.token, [k.to_string() for k in keys])
        for i, p in enumerate(pubs):
            if p is None:
                continue
            try:
                e = p.to_entry(keys[i])
            except (GdsKvCacheError, ValueError) as exc:
                out.malformed += 1
                log.warning("ignoring entry %s of writer %s: %s", p.key, p.writer, exc)
                continue
            out.pins[i] = Pin(e, p.writer, p.boot, stale=p.boot != p.writer_boot)
        return out

    def unpin(self, pins: Pins) -> None:
        """End the leases of ``pins`` (they also expire on their own)."""
        if pins.held:
            self.redis.release(pins.token, pins.held)

    # -- writers ------------------------------------------------------------------------------------
    def layout(self, writer: str, boot: str) -> Optional[PoolLayout]:
        """``writer``'s pool layout as its run ``boot`` registered it; None if it is not that run's
        or is unusable (a garbled field, a directory outside the shared one)."""
        lay = self.redis.layout(writer)
        if not isinstance(lay, dict) or lay.get("boot", "") != boot:
            return None
        rel = lay.get("dir")
        try:
            if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.split("/"):
                raise LayoutError(f"pool layout field 'dir' is {rel!r}, not a path inside the shared directory")
            return PoolLayout.from_fields(os.path.join(self.shared_dir, rel), lay)
        except LayoutError as e:
            log.warning("ignoring writer %s: its Redis layout is unusable: %s", writer, e)
            return None

"""``RemoteReader``: shared mode's reads of other writers' chunks.

A read leases the entries in Redis (one script for the batch), reads each
writer's extents through a read-only engine over that writer's pool files
(KvikIO or POSIX, opened once per writer run, never a mapping that a
restarting writer could shrink under it), checks every chunk against its
published checksum in one launch, and releases the leases off the caller's
path. A chunk whose lease ran out before its check, whose entry came from an
earlier run of its writer, or that fails its checksum is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from ..config import CacheEngineConfig
from ..errors import CorruptChunkError, GdsKvCacheError
from ..io import open_engine
from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface
from ..storage.tombstone import is_tombstone
from ..storage.transfer import DiskTransfer
from .redis_index import redis_errors
from .shared_index import Pin, Pins, SharedIndex

__all__ = ["RemoteReader"]

log = logging.getLogger(__name__)


class RemoteReader:
    """Reads other writers' chunks of one shared directory.

    Parameters
    ----------
    index
        The shared index (pins, writer layouts).
    shared_dir
        The shared directory (writer layouts name paths below it).
    config
        Engine settings (``io_engine``, ``io_threads``, ...) for the read-only engines.
    memory_allocator
        The slab chunks are read into.
    lease_ttl
        Seconds a lease lasts: a read that took longer is a miss.
    writer
        This process's writer id (its own chunks are not read here).
    stats
        The backend's counters (``remote_hits``, ``remote_misses``, ``lease_expired``,
        ``remote_corrupt``, ``redis_errors``), updated in place.
    """

    def __init__(self, index: SharedIndex, config: CacheEngineConfig,
                 memory_allocator: MemoryAllocatorInterface, lease_ttl: float, writer: str, stats: dict):
        self.index = index
        self.config = config
        self.memory_allocator = memory_allocator
        self.lease_ttl = lease_ttl
        self.writer = writer
        self._stats = stats
        self._errors = redis_errors()
        self._readers: dict[str, tuple] = {}    # writer -> (boot, DiskTransfer over its files)
        self._r_lock = threading.Lock()
        self._retired_engines: list = []
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="gds-kvcache-shared-release")
        self._hold_s = 0.0          # tests: seconds a read sleeps while holding its leases
        self._warned: set = set()   # (writer, boot) whose read errors were logged as warnings

    def read(self, keys: Sequence[CacheEngineKey], which: list[int], out: list) -> None:
        """Read ``keys[i]`` for ``i`` in ``which`` from other writers' files into ``out[i]`` (a
        chunk with one reference, the caller's; left None on a miss)."""
        t0 = time.monotonic()
        try:
            pins = self.index.pin([keys[i] for i in which])
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("remote read: Redis unreachable: %s", e)
            return
        self._stats["remote_malformed"] += pins.malformed
        got: list[tuple[int, object]] = []        # (index into keys, object read and verified)
        bad: list[tuple[Pin, DiskTransfer]] = []  # pins whose chunk failed (unreadable, corrupt)
        errs: list[BaseException] = []
        try:
            if self._hold_s and pins.held:
                time.sleep(self._hold_s)
            # Another writer's chunks, grouped by writer (one transfer per writer); an entry of a
            # writer's earlier run (its boot changed) may point at reused bytes: a miss.
            todo: dict[tuple[str, str], list[tuple[int, Pin]]] = {}
            for i, p in zip(which, pins.pins):
                if p is None or p.writer == self.writer or p.stale:
                    continue
                todo.setdefault((p.writer, p.boot), []).append((i, p))
            for (w, boot), items in todo.items():
                try:
                    tr = self._transfer_of(w, boot)
                except self._errors as exc:          # its layout unreadable now: misses
                    self._stats["redis_errors"] += 1
                    log.debug("remote read: Redis unreachable: %s", exc)
                    tr = None
                if tr is None:
                    continue
                res = tr.read_verified(self.memory_allocator, [p.entry for _, p in items], verify=True)
                bad += [(items[j][1], tr) for j, _ in res.bad]
                errs += [why for _, why in res.bad]
                got += [(items[j][0], o) for j, o in enumerate(res.objs) if o is not None]
            if time.monotonic() > t0 + self.lease_ttl:
                # The lease ran out before the check: the extent may have been reused, so a
                # failed checksum says nothing about the chunk and a good one is not trusted.
                self._stats["lease_expired"] += len(got) + len(bad)
            else:
                for (p, tr), why in zip(bad, errs):
                    self._read_error(p, why, tr)
                for i, o in got:
                    out[i] = o
            n_hit = sum(1 for i in which if out[i] is not None)
            self._stats["remote_hits"] += n_hit
            self._stats["remote_misses"] += len(which) - n_hit
        finally:
            for i, o in got:
                if out[i] is not o:
                    o.ref_count_down()
            if pins.held:
                # Off the caller's path (a round trip): until it lands, the owner just waits a little longer.
                self._releaser.submit(self._release, pins)

    def _read_error(self, p: Pin, err: BaseException, tr: DiskTransfer) -> None:
        """A miss; warned once per writer run (a writer restarting with a smaller pool makes every
        read of its last run's entries fail until it re-registers), the rest at debug level. A
        checksum failure over a tombstone is a chunk its writer dropped while Redis could not be
        told (``remote_removed``), not corruption."""
        if isinstance(err, CorruptChunkError) and is_tombstone(tr.pool, p.entry.offset):
            self._stats["remote_removed"] += 1
            log.debug("chunk %s of writer %s was dropped by its writer", p.entry.key.to_string(), p.writer)
            return
        self._stats["remote_corrupt" if isinstance(err, CorruptChunkError) else "remote_read_errors"] += 1
        if (p.writer, p.boot) in self._warned:
            log.debug("reading chunk %s of writer %s: %s", p.entry.key.to_string(), p.writer, err)
            return
        self._warned.add((p.writer, p.boot))
        log.warning("reading chunk %s of writer %s: %s (further read errors of this writer run at debug level)",
                    p.entry.key.to_string(), p.writer, err)

    def drain(self) -> None:
        """Wait for the lease releases queued so far (``close`` of the backend, tests)."""
        self._releaser.submit(lambda: None).result()

    def _release(self, pins: Pins) -> None:
        try:
            self.index.unpin(pins)
        except self._errors as e:    # the leases expire on their own
            self._stats["redis_errors"] += 1
            log.debug("lease release failed: %s", e)

    def _transfer_of(self, writer: str, boot: str) -> Optional[DiskTransfer]:
        """A read-only transfer over ``writer``'s pool files (opened once per writer run)."""
        with self._r_lock:
            have = self._readers.get(writer)
            if have is not None and have[0] == boot:
                return have[1]
        layout = self.index.layout(writer, boot)
        if layout is None:          # not that run's, or unusable (SharedIndex.layout says which)
            return None
        try:
            engine = open_engine(layout.pool_paths, self.config, self.memory_allocator.kind, layout.stripe_bytes,
                                 read_only=True)
            engine.attach(self.memory_allocator.buffer)
        except (OSError, GdsKvCacheError) as e:
            log.warning("cannot open writer %s's pool files: %s", writer, e)
            return None
        tr = DiskTransfer(engine, layout)
        with self._r_lock:
            old = self._readers.pop(writer, None)
            self._readers[writer] = (boot, tr)
            if old is not None:
                # Closed only at close(): a read in flight may still use it.
                self._retired_engines.append(old[1].engine)
        return tr

    def close(self) -> None:
        """Finish the queued lease releases and close every reader engine (no read may be in flight)."""
        self._releaser.shutdown(wait=True)
        with self._r_lock:
            engines = [tr.engine for _, tr in self._readers.values()] + self._retired_engines
            self._readers.clear()
            self._retired_engines = []
        for eng in engines:
            try:
                eng.close()
            except Exception as e:
                log.debug("closing a reader engine: %s", e)

"""``PutPath``: a shared-mode put (claim in Redis -> write here -> publish once durable).

Invariants: a key is written only by the writer whose claim won (or by this
writer alone while Redis is unreachable: it stores locally and publishes
once Redis answers); a claim on a key not written is given back at once; a
put's future resolves only after its chunk is published (or marked for the
next re-publish pass), so a lookup anywhere sees the chunk once the future
is done. A writer that has not reached Redis since it started stores locally
(its first contact publishes its whole index) and evicts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Optional, Sequence

from ..errors import StorageFullError
from ..key import CacheEngineKey
from ..storage import LocalDiskBackend
from .eviction import RetractThenFree
from .publisher import Publisher
from .shared_index import SharedIndex

__all__ = ["PutPath"]

log = logging.getLogger(__name__)

#: Seconds between warnings that puts are stored without Redis.
_WARN_EVERY = 60.0


class PutPath:
    """The put side of one writer of a shared directory (see the module docstring)."""

    def __init__(self, index: SharedIndex, local: LocalDiskBackend, pub: Publisher, eviction: RetractThenFree,
                 stats: dict, errors: tuple):
        self.index = index
        self.local = local
        self.pub = pub
        self.eviction = eviction
        self._stats = stats
        self._errors = errors
        self._warned_at = -_WARN_EVERY
        self._warned_count = 0

    def put(self, keys: list, objs: list) -> list[Optional[Future]]:
        out: list[Optional[Future]] = [None] * len(keys)
        idx = self.local.index
        if not self.pub.registered:
            # Redis has not answered since this writer started: store here all the same (its first
            # contact publishes every chunk of the index); a reader of the last run's entries meets
            # reused bytes only as a checksum miss, and no extent is evicted until then.
            mine = [True] * len(keys)
            self._local_only(len(keys), "not registered with Redis yet")
        else:
            try:
                mine = self.index.claim(self.pub.writer, keys)
            except self._errors as e:
                self._stats["redis_errors"] += 1
                mine = [True] * len(keys)
                self._local_only(len(keys), f"claim failed: {e}")
        self._stats["claims_lost"] += mine.count(False)
        sel = [i for i in range(len(keys)) if mine[i] and not idx.contains(keys[i])]
        claimed = [k for k, m in zip(keys, mine) if m]
        try:
            futs = self._submit(keys, objs, sel, 1) if sel else {}
            # Refused at reservation (free space fragmented, or held by leased chunks): evict
            # unleased LRU chunks around the leased ones, more each round, and try again.
            for factor in (2, 4, 8):
                again = [i for i in sel if futs[i] is not None and futs[i].done()
                         and isinstance(futs[i].exception(), StorageFullError)]
                if not again:
                    break
                # Those refusals are not the caller's errors: the last round's outcome is (``stats``).
                self._stats["put_retries"] += len(again)
                futs.update(self._submit(keys, objs, again, factor))
        except BaseException:
            self._unclaim(claimed)
            raise
        writing = [i for i in sel if futs[i] is not None]
        # A claim on a key not being written (stored here already, or a repeat) is given back now.
        written = {keys[i] for i in writing}
        self._unclaim([k for k in claimed if k not in written])
        pairs = [(keys[i], futs[i]) for i in writing]
        for i, f in zip(writing, self._published_when_done(pairs)):
            out[i] = f
        return out

    def _local_only(self, n: int, why: str) -> None:
        """Count puts stored without Redis; warn at most once a minute, with the count since."""
        self._stats["local_only_puts"] += n
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            log.warning("writer %s: Redis unreachable (%s): %d put(s) stored here only, published once it answers",
                        self.pub.writer, why, self._stats["local_only_puts"] - self._warned_count)
            self._warned_at, self._warned_count = now, self._stats["local_only_puts"]

    def _unclaim(self, keys: Sequence[CacheEngineKey]) -> None:
        """Give back this writer's put claims on ``keys`` so another writer may store them."""
        if not keys:
            return
        try:
            self.index.unclaim(self.pub.writer, keys)
        except self._errors as e:     # the claims expire on their own (claim_ttl)
            self._stats["redis_errors"] += 1
            log.debug("unclaim failed: %s", e)

    def _published_when_done(self, pairs: list[tuple[CacheEngineKey, Future]]) -> list[Future]:
        """Futures that resolve like the local puts' ``pairs``, but only after the chunks written
        are published (one round trip for the whole batch, from the thread that finished last)."""
        outs = [Future() for _ in pairs]
        left = [len(pairs)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            done = [k for k, f in pairs if not f.cancelled() and f.exception() is None]
            failed = [k for k, f in pairs if f.cancelled() or f.exception() is not None]
            try:
                self._unclaim(failed)
                if done:
                    self.pub.publish_current(done)
            except self._errors as e:
                self.pub.dirty = True        # written and indexed here: published by the next pass
                self._stats["redis_errors"] += 1
                log.debug("publish failed (%s): re-published when Redis answers", e)
            except Exception:             # the puts themselves succeeded: never lose their results
                self.pub.dirty = True
                log.exception("publishing %d chunk(s) failed", len(done))
            finally:
                for (_, f), o in zip(pairs, outs):
                    if f.cancelled():
                        o.cancel()
                    elif f.exception() is not None:
                        o.set_exception(f.exception())
                    else:
                        o.set_result(f.result())

        for _, f in pairs:
            f.add_done_callback(one_done)
        return outs

    def _submit(self, keys, objs, sel: list[int], factor: int) -> dict:
        if factor > 1:
            # The put itself makes room for what it asks (the strategy's make_room); a retry
            # after a refusal evicts that many LRU bytes whatever the free count says, since
            # free bytes in pieces smaller than a chunk do not hold it.
            self.eviction.make_room(factor * sum(objs[i].phys_size for i in sel), len(sel), force=True)
        futs = self.local.batched_submit_put_task([keys[i] for i in sel], [objs[i] for i in sel])
        return dict(zip(sel, futs))

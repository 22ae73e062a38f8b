"""Re-publishing the chunks of writers that are down, so a node that never comes back loses nothing.

After Redis lost its data (a restart, a flush) a writer's chunks stay listed
only once that writer re-publishes them; a writer that is down cannot. Any
live process may do it for it: a writer directory whose lock is free belongs
to no running process, so its index log and layout file are the truth and
no extent of it can be reused meanwhile.

Invariants: the dead writer's files are only read (``IndexLog.load`` writes
nothing); its layout is registered under a fresh run id (``adopted-...``)
while its directory lock is held, so a restart of that writer, which takes
the lock first and registers its own run, always wins: entries published
under the adopted run are then stale and never leased. A writer Redis still
knows (its layout hash is there) is left alone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from typing import Optional

from ..config.values import is_writer_id
from ..storage.index_log import IndexLog
from ..storage.pool_file import PoolLayout
from .publisher import WRITERS_DIR
from .redis_index import Published, RedisIndex

__all__ = ["adopt_dead_writers"]

log = logging.getLogger(__name__)



def _lock_if_dead(path: str) -> Optional[int]:
    """A descriptor holding ``path``'s directory lock if no process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            log.debug("cannot lock %s: %s", path, e)
        return None
    return fd


def adopt_dead_writers(shared_dir: str, own: str, redis: RedisIndex, batch: int = 2000) -> int:
    """Publish the chunks of every writer of ``shared_dir`` that is down and unknown to Redis.

    Returns the chunks published. Redis errors propagate (the caller's
    housekeeping retries on its next pass).
    """
    base = os.path.join(shared_dir, WRITERS_DIR)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return 0
    total = 0
    for wid in names:
        path = os.path.join(base, wid)
        if wid == own or not is_writer_id(wid) or not os.path.isdir(path):
            continue
        if redis.layout(wid):
            continue                       # Redis knows it: alive, or listed before the loss
        fd = _lock_if_dead(path)
        if fd is None:
            continue                       # a live process holds it: it re-publishes itself
        try:
            try:
                layout = PoolLayout.read(path)
                entries, _ = IndexLog(path).load()
            except Exception as e:  # noqa: BLE001 - a directory we cannot read is left as it is
                log.warning("cannot adopt writer %s: %s", wid, e)
                continue
            entries = [e for e in entries if layout.fits(e.offset, e.phys_size)]
            boot = f"adopted-{uuid.uuid4().hex[:8]}"
            # Registered while its lock is held: if the writer restarts, it registers after this.
            redis.register(wid, dict(layout.fields(), dir=os.path.join(WRITERS_DIR, wid), boot=boot))
        finally:
            os.close(fd)
        for i in range(0, len(entries), batch):
            redis.publish(wid, [Published.of_entry(e, wid, boot) for e in entries[i:i + batch]])
        total += len(entries)
        log.warning("writer %s is down and Redis had lost its chunks: %d chunk(s) published for it", wid,
                    len(entries))
    return total

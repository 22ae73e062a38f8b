"""The worker's side of fleet mode: which pool each chunk of a job is moved through.

A plain spec moves every chunk of a shard through that shard's directory
(``root/rank<s>``). A fleet spec (``fleet_specs``) names the pool of each
chunk: this instance's own writer directory (opened read-write, as the
plain directory is, and shared with its stores) or another instance's,
opened read-only (KvikIO or POSIX, never a mapping a restarting writer could
shrink under it), once per writer run. Every chunk still goes through
``DiskTransfer.read_verified``, so a chunk of another instance is used only
if its bytes match the checksum its writer published, and only before the
scheduler's leases end (``FleetLoadSpec.deadline``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional

from ...config import CacheEngineConfig
from ...errors import GdsKvCacheError
from ...io import open_engine
from ...storage.pool_layout import LayoutError, PoolLayout
from ...storage.transfer import DiskTransfer
from .fleet_specs import FleetLoadSpec, FleetStoreSpec, PoolRef

__all__ = ["ReadOnlyPools", "load_groups", "store_path"]

log = logging.getLogger(__name__)


def store_path(root: str, spec, shard: int) -> str:
    """The directory a store job of ``shard`` writes: the spec's (fleet) or ``root/rank<shard>``."""
    if isinstance(spec, FleetStoreSpec) and shard < len(spec.dirs):
        return spec.dirs[shard]
    return os.path.join(root, f"rank{shard}")


class ReadOnlyPools:
    """Read-only transfers over other instances' pools, one per writer directory and run.

    A writer that restarted (another ``boot``) may have resized its files, so
    its transfer is opened again; the old engine is closed only at ``close``,
    since a job in flight may still read through it.
    """

    def __init__(self, config: CacheEngineConfig, allocator):
        self.config = config
        self.allocator = allocator
        self._open: dict[str, tuple[str, DiskTransfer]] = {}     # path -> (boot, transfer)
        self._retired: list = []
        self._lock = threading.Lock()
        self._warned: set = set()

    def get(self, ref: PoolRef) -> Optional[DiskTransfer]:
        """The transfer over ``ref``'s pool, or None if its files cannot be opened (its chunks fail)."""
        with self._lock:
            have = self._open.get(ref.path)
            if have is not None and have[0] == ref.boot:
                return have[1]
        try:
            layout = PoolLayout.from_fields(ref.path, ref._asdict())
            engine = open_engine(layout.pool_paths, self.config, self.allocator.kind, layout.stripe_bytes,
                                 read_only=True)
            engine.attach(self.allocator.buffer)
        except (OSError, LayoutError, GdsKvCacheError) as e:
            if (ref.path, ref.boot) not in self._warned:
                self._warned.add((ref.path, ref.boot))
                log.warning("cannot open the pool of %s: %s; its chunks are recomputed", ref.path, e)
            return None
        tr = DiskTransfer(engine, layout)
        with self._lock:
            old = self._open.pop(ref.path, None)
            self._open[ref.path] = (ref.boot, tr)
            if old is not None:
                self._retired.append(old[1].engine)
        return tr

    def close(self) -> None:
        with self._lock:
            engines = [tr.engine for _, tr in self._open.values()] + self._retired
            self._open.clear()
            self._retired = []
        for eng in engines:
            try:
                eng.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("closing a read-only pool engine: %s", e)


def load_groups(spec, shard: int, chunks: list, blocks: list, own_pool: Callable[[str], DiskTransfer],
                default_pool: Callable[[], DiskTransfer], remote: Optional[ReadOnlyPools]
                ) -> list[tuple[DiskTransfer, list[int], Optional[float]]]:
    """The chunks of a load job to read, grouped by pool: ``(transfer, chunk indexes, deadline)``.

    ``own_pool(path)`` opens this instance's directory, ``default_pool()``
    the shard's plain directory; chunks whose pool cannot be opened are in no
    group (they fail, and vLLM recomputes them).
    """
    want = [j for j, c in enumerate(chunks) if c is not None and blocks[j]]
    if not isinstance(spec, FleetLoadSpec):
        return [(default_pool(), want, None)] if want else []
    sources = spec.sources[shard] if shard < len(spec.sources) else []
    by_pool: dict[int, list[int]] = {}
    for j in want:
        src = sources[j] if j < len(sources) else None
        if src is not None and 0 <= src < len(spec.pools):
            by_pool.setdefault(src, []).append(j)
    out = []
    for src, js in by_pool.items():
        ref = PoolRef(*spec.pools[src])
        if ref.own:
            out.append((own_pool(ref.path), js, None))
            continue
        tr = remote.get(ref) if remote is not None else None
        if tr is not None:
            out.append((tr, js, spec.deadline))
    return out

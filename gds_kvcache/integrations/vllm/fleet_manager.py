"""``FleetOffloadingManager``: the scheduler side of fleet mode, several vLLM instances on one cache.

Turned on by ``lookup_url`` (or ``lookup_server_url``) in
``kv_connector_extra_config``: ``local_disk`` is then the directory every
instance shares, and Redis its index. The manager is the local one
(``DiskOffloadingManager``) over this instance's own writer directories
(``FleetWriters``: stores go there and are published to Redis), plus
lookups of other instances' chunks (``FleetLookups``: one round trip per
request, leases until the load ended). A load spec names each chunk's pool
(``FleetLoadSpec``); workers read other instances' chunks read-only and
check every one against its published checksum.

Invariants: a key is a hit when this instance holds every shard of it, or
when every shard is leased from other instances; a chunk another instance
published or claimed is not stored again here; a chunk failed in a load is
dropped only from this instance's own index (another instance's chunk is
only ever dropped by its writer); without Redis, lookups of other instances'
chunks miss and stores stay local (published once it answers).

Threads: vLLM calls the manager from its scheduler thread only (0.33 wraps
the calls in ``OffloadingManager.lock``, a no-op here, which is right: the
background threads, housekeeping and lease releases, touch only the indexes,
which lock themselves, and Redis, never the manager's own state).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Optional

from vllm.v1.kv_offload.base import LookupResult, OffloadKey, PrepareStoreOutput, ReqContext

from ...config import CacheEngineConfig
from .fleet_lookup import FleetLookups
from .fleet_specs import FleetLoadSpec, FleetStoreSpec, PoolRef
from .fleet_writers import FleetWriters
from .manager import DiskOffloadingManager, KeyMaker
from .specs import entry_to_wire

__all__ = ["FleetOffloadingManager", "FLEET_COUNTERS"]

log = logging.getLogger(__name__)

#: The manager's fleet counters (besides the local ones and the shared machinery's).
FLEET_COUNTERS = ("remote_lookups", "remote_hits", "remote_misses", "remote_chunks_loaded", "remote_load_failures",
                  "lease_renewals", "redis_errors")


class FleetOffloadingManager(DiskOffloadingManager):
    """``DiskOffloadingManager`` over this instance's writer directories, plus other instances' chunks.

    Parameters are the local manager's, plus ``config`` (the shared mode's
    settings). ``stats_path`` is ``<local_disk>/vllm-stats.<base>.json``,
    one per instance (``<base>`` names its writer directories).
    """

    def __init__(self, root: str, shards: int, chunk_bytes: int, key_maker: KeyMaker, config: CacheEngineConfig,
                 enable_events: bool = False):
        self._config = config
        self.writers: Optional[FleetWriters] = None
        self.lookups: Optional[FleetLookups] = None
        super().__init__(root, shards, config.disk_bytes, config.pool_files, chunk_bytes, key_maker,
                         enable_events=enable_events)
        self.fleet_stats = dict.fromkeys(FLEET_COUNTERS, 0)
        n = len(self._indexes)
        self.lookups = FleetLookups(self.writers.index, lambda k: [self._ck(k, s) for s in range(n)],
                                    set(self.writers.writers), config.lease_ttl, self.fleet_stats)
        # load token -> ({(shard, chunk key): chunk index} of other instances' chunks, indexes failed so far,
        #                {chunk index: (offload key, bytes read from other instances)})
        self._remote_loads: dict[str, tuple[dict, set, dict]] = {}
        log.info("gds_kvcache fleet mode: writers %s under %s, Redis %s", ", ".join(self.writers.writers),
                 self.root, self.writers.redis.url)

    def _open_shards(self, shards: int, disk_bytes: int, pool_files: int) -> None:
        self.writers = FleetWriters(self.root, shards, self._config)
        self._dirs, self._indexes = list(self.writers.dirs), list(self.writers.indexes)
        # Job tokens and the counters file name this instance: the directory is shared.
        self._prefix = f"{self.writers.base}+{self._prefix}"
        self._jobs_owned = f"{self.writers.base}+"
        self.stats_path = f"{self.root}/vllm-stats.{self.writers.base}.json"

    # -- lookups ---------------------------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        got = super().lookup(key, req_context)
        if got != LookupResult.MISS:
            return got
        remote = self.lookups.lookup(key, req_context.req_id)
        if remote is None:
            return LookupResult.RETRY
        if remote:
            self._count_hit(key)
        return LookupResult.HIT if remote else LookupResult.MISS

    def on_schedule_end(self, context) -> None:
        self.lookups.flush()
        super().on_schedule_end(context)

    def on_request_finished(self, req_context: ReqContext) -> None:
        self.lookups.finished(req_context.req_id)

    # -- loads -----------------------------------------------------------------------------------
    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> FleetLoadSpec:
        keys = list(keys)
        spec = super().prepare_load(keys, req_context)
        pools: list[PoolRef] = []
        where: dict[tuple, int] = {}

        def ref(p: PoolRef) -> int:
            if (p.path, p.boot) not in where:
                where[(p.path, p.boot)] = len(pools)
                pools.append(p)
            return where[(p.path, p.boot)]

        n = len(self._indexes)
        own = [ref(PoolRef(d.path, lay.stripes, lay.stripe_bytes, lay.unit, self.writers.boot, True))
               for d, lay in ((d, d.layout) for d in self._dirs)]
        sources = [[own[s] if c is not None else None for c in spec.chunks[s]] for s in range(n)]
        need = [i for i in range(len(keys)) if any(spec.chunks[s][i] is None for s in range(n))]
        remote: dict[tuple[int, str], int] = {}        # (shard, chunk key) -> index, of other instances' chunks
        nbytes: dict[int, int] = {}                    # index -> bytes of its shards read from other instances
        pins, refs, until = self.lookups.take([keys[i] for i in need], req_context.req_id)
        for i, ps, rs in zip(need, pins, refs):
            if ps is None:
                continue
            for s in range(n):
                if spec.chunks[s][i] is None and rs[s] is not None:
                    spec.chunks[s][i] = entry_to_wire(ps[s].entry)
                    sources[s][i] = ref(rs[s])
                    remote[(s, ps[s].entry.key.to_string())] = i
                    nbytes[i] = nbytes.get(i, 0) + ps[s].entry.nbytes
        if remote:
            self._remote_loads[spec.token] = (remote, set(), {i: (keys[i], n) for i, n in nbytes.items()})
        return FleetLoadSpec(spec.token, spec.chunks, sources, pools, until if remote else None,
                             getattr(spec, "groups", None))

    def _on_load_result(self, token: str, results: list) -> None:
        remote = self._remote_loads.get(token)
        if remote is None:
            return
        chunks, failed, sizes = remote
        for s, res in enumerate(results):
            if res is not None:
                gone = set(res.get("bad", ())) | set(res.get("failed", ()))
                failed.update(i for (s2, k), i in chunks.items() if s2 == s and k in gone)
        if token not in self._load_tokens:          # every shard reported: count the job once
            del self._remote_loads[token]
            # The local counters count chunks read from this instance's files only; these were read
            # (at least one shard) from other instances': counted here, per group too.
            for i, (okey, n) in sizes.items():
                if i not in failed:
                    self._count_loaded(okey, n)
            self.fleet_stats["remote_chunks_loaded"] += len(sizes) - len(failed)
            self.fleet_stats["remote_load_failures"] += len(failed)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        super().complete_load(keys, req_context)
        self.lookups.load_done(req_context.req_id)

    # -- stores ----------------------------------------------------------------------------------
    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> Optional[PrepareStoreOutput]:
        keys = list(dict.fromkeys(keys))
        idx0 = self._indexes[0]
        new = [k for k in keys if not idx0.contains(self._ck(k)) and not idx0.in_flight(self._ck(k))]
        mine = self.writers.claim([self._ck(k) for k in new])
        take = {k for k, m in zip(new, mine) if m}
        todo = [k for k in keys if k in take]
        self.writers.make_room(len(take) * self._chunk_phys, len(take))
        out = super().prepare_store(todo, req_context)
        for factor in (2, 4, 8):
            if out is not None or not todo:
                break
            # Refused: room the eviction made may still be on its way back (another thread retracting
            # it), or free bytes lie in pieces; as shared mode's puts do, evict more and try again.
            self.writers.make_room(factor * len(todo) * self._chunk_phys, len(todo), force=True)
            out = super().prepare_store(todo, req_context)
        stored = set(out.keys_to_store) if out is not None else set()
        self.writers.unclaim([self._ck(k) for k in take if k not in stored])
        if out is None:
            return None
        spec = out.store_spec
        dirs = [d.path for d in self._dirs]
        return PrepareStoreOutput(keys_to_store=out.keys_to_store,
                                  store_spec=FleetStoreSpec(spec.token, spec.extents, dirs, getattr(spec, "groups", None)),
                                  evicted_keys=out.evicted_keys)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        tokens = {self._pending_store[k] for k in keys if k in self._pending_store}
        todo = [k for t in tokens for k in self._stores.get(t, ([], []))[0]]
        super().complete_store(keys, req_context, success)
        if todo:
            n = len(self._indexes)
            self.writers.published([[self._ck(k, s) for k in todo] for s in range(n)],
                                   [self._ck(k) for k in todo])

    # -- management ------------------------------------------------------------------------------
    def reset_cache(self) -> None:
        """Drop this instance's chunks (retracted from Redis); other instances' chunks stay theirs."""
        super().reset_cache()
        self.writers.retire_now()
        self.lookups.reset()

    def _write_stats(self) -> None:
        if self.writers is not None and getattr(self, "fleet_stats", None) is not None:
            self.stats.update(self.fleet_stats)
            shared = self.writers.counters()
            for k in ("published", "republishes", "claims_lost", "local_only_puts", "shared_evictions",
                      "retracted", "leased_skips", "adopted", "tombstoned", "redis_timeouts"):
                self.stats[k] = shared.get(k, 0)
            self.stats["redis_errors"] = self.fleet_stats["redis_errors"] + shared.get("redis_errors", 0)
            self.counters.dirty = True
        super()._write_stats()

    def shutdown(self) -> None:
        """Release every lease, stop the writers' housekeeping, then close as the local manager does."""
        try:
            if self.lookups is not None:
                self.lookups.close()
            if self.writers is not None:
                self.writers.stop()
        finally:
            super().shutdown()
            if self.writers is not None:
                self.writers.close()


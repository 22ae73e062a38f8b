"""``DiskOffloadingManager``: vLLM's scheduler-side view of the disk tier, over ``DiskIndex`` alone.

The scheduler process owns every index decision: which chunk is stored,
where it lives in the pool, what may be evicted. Workers get those
decisions in the specs (pool extents, checksums) and only move bytes. So
the index has one writer, and a lookup answers from the same index that
pins a chunk for its load: a chunk promised by ``lookup`` and pinned by
``prepare_load`` cannot be evicted or overwritten before ``complete_load``.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Collection, Iterable, Sequence
from typing import Optional

from vllm.v1.kv_offload.base import (LookupResult, Medium, OffloadingEvent, OffloadingManager,
                                     OffloadKey, PrepareStoreOutput, ReqContext, RequestOffloadingContext,
                                     get_offload_group_idx)

from ...key import CacheEngineKey
from ...storage.disk_index import DiskEntry, DiskIndex
from ...storage.pool_file import PoolDirectory, index_reserve
from ...units import PAGE, align_up
from .channel import JOBS_DIR, take_result
from .counters import ManagerCounters
from .keys import KeyMaker
from .metrics import MetricsReporter
from .specs import DiskLoadSpec, DiskStoreSpec, entry_from_stored, entry_to_wire

__all__ = ["DiskOffloadingManager", "DiskLoadSpec", "DiskStoreSpec", "KeyMaker", "STATS_NAME"]

log = logging.getLogger(__name__)

#: The manager's counters, rewritten as they change (for tests, dashboards and the CLI).
STATS_NAME = "vllm-stats.json"


class DiskOffloadingManager(OffloadingManager):
    """Scheduler side of the plug-in: lookups, pins, reservations and commits on the disk index.

    Parameters
    ----------
    root
        The plug-in's directory: shard ``s`` is the library directory
        ``root/rank<s>``, transfer results go to ``root/jobs``.
    shards
        Directories to keep (world size, or 1 where ranks hold identical bytes).
    disk_bytes
        Budget of each shard directory (pool and index).
    pool_files
        Files each pool is striped over.
    chunk_bytes
        Bytes of one full chunk of one shard (``blocks_per_chunk`` blocks).
    key_maker
        Offload keys -> chunk keys.
    enable_events
        Report stores and removals to vLLM (``take_events``).

    Notes
    -----
    Only this process opens the index (it holds each shard directory's
    lock); workers open the pool files without it. Models with several KV
    cache groups (``set_groups``) store and load each group's chunks apart:
    the offload key names its group, the specs tell the workers which group
    each chunk is, and the counters are kept per group too. Results of
    stores (the chunk checksums) come back through ``channel``: a store
    whose result is missing or failed is aborted, never recorded, so the
    index never names a chunk whose bytes are not known good. Chunks a load
    found corrupt are dropped at ``complete_load``.
    """

    def __init__(self, root: str, shards: int, disk_bytes: int, pool_files: int, chunk_bytes: int,
                 key_maker: KeyMaker, enable_events: bool = False):
        self.root = os.path.abspath(root)
        self.medium = Medium.STORAGE
        self._keys = key_maker
        self._chunk_phys = align_up(chunk_bytes, PAGE)
        self._dirs: list[PoolDirectory] = []
        self._indexes: list[DiskIndex] = []
        self._prefix = uuid.uuid4().hex[:12]     # of this process's job tokens
        self._jobs_owned = ""                    # result files an earlier run of this owner left start so
        self.stats_path = os.path.join(self.root, STATS_NAME)
        try:
            self._open_shards(shards, disk_bytes, pool_files)
            # Results of jobs an earlier process never completed: nothing will read them.
            jobs = os.path.join(self.root, JOBS_DIR)
            os.makedirs(jobs, exist_ok=True)
            for name in os.listdir(jobs):
                if name.startswith(self._jobs_owned):
                    os.unlink(os.path.join(jobs, name))
        except BaseException:
            self.shutdown()
            raise
        self._okey: dict[CacheEngineKey, OffloadKey] = {}      # shard-0 chunk key -> offload key
        self._pending_store: dict[OffloadKey, str] = {}        # offload key -> store token
        self._stores: dict[str, tuple] = {}                    # token -> (keys, extents per shard)
        self._loads: dict[OffloadKey, list[tuple[str, list[Optional[DiskEntry]]]]] = {}  # pins per load
        self._load_tokens: dict[str, list[OffloadKey]] = {}  # load jobs whose result is not read yet
        self._tokens = itertools.count()
        self.events: Optional[list[OffloadingEvent]] = [] if enable_events else None
        self.counters = ManagerCounters()
        self.stats, self.group_stats = self.counters.stats, self.counters.groups
        self._group_index: dict[int, int] = {}              # group id -> index among the offloaded groups
        self._group_tokens: dict[int, int] = {}             # group id -> tokens per chunk
        self._reporter = MetricsReporter()
        self._write_stats()

    def _open_shards(self, shards: int, disk_bytes: int, pool_files: int) -> None:
        """Lock and recover the directory of each shard (``root/rank<s>``) into ``_dirs``/``_indexes``."""
        for s in range(shards):
            d = PoolDirectory(os.path.join(self.root, f"rank{s}"), disk_bytes, pool_files)
            self._dirs.append(d)
            idx = DiskIndex(d, index_reserve(disk_bytes), events=False)
            self._indexes.append(idx)
            idx.recover()
            idx.track_events(True)  # from here: recovered chunks are not news to this vLLM instance

    # -- helpers ---------------------------------------------------------------
    def _ck(self, okey: OffloadKey, shard: int = 0) -> CacheEngineKey:
        return self._keys(okey, shard)

    def _token(self, kind: str) -> str:
        return f"{self._prefix}-{kind}{next(self._tokens)}"

    def set_groups(self, groups: Sequence[tuple[int, int]]) -> None:
        """The offloaded KV cache groups in vLLM's order, as ``(group id, tokens per chunk)``."""
        self._group_index = {gid: i for i, (gid, _) in enumerate(groups)}
        self._group_tokens = {gid: int(t) for gid, t in groups}

    def _groups_of(self, keys) -> list[int]:
        """Each key's group as the workers index it (its position among the offloaded groups)."""
        return [self._group_index.get(get_offload_group_idx(k), 0) for k in keys]

    def _bump_group(self, key: OffloadKey, name: str, n: int = 1) -> None:
        self.counters.bump_group(get_offload_group_idx(key), name, n)

    def _bump(self, name: str, n: int = 1) -> None:
        self.counters.bump(name, n)

    def _count_hit(self, key: OffloadKey) -> None:
        tokens = self._group_tokens.get(get_offload_group_idx(key), 0)
        self._bump("hits")
        self._bump("hit_tokens", tokens)
        self._bump_group(key, "hits")
        self._bump_group(key, "hit_tokens", tokens)

    def _count_loaded(self, key: OffloadKey, nbytes: int) -> None:
        self._bump("chunks_loaded")
        self._bump("bytes_loaded", nbytes)
        self._bump_group(key, "chunks_loaded")
        self._bump_group(key, "bytes_loaded", nbytes)

    def _write_stats(self) -> None:
        self.counters.write(self.stats_path, len(self._indexes[0]) if self._indexes else 0)

    def _drain(self) -> list:
        """Index inserts/removals -> vLLM events (shard 0 speaks for all; chunks recovered from
        disk have no known offload key and are left out)."""
        removed, stored = [], []
        for op, ck in self._indexes[0].drain_events():
            ok = self._okey.get(ck)
            if op == "remove":
                self._bump("evictions")
                if ok is not None:
                    removed.append(ok)
                    self._okey.pop(ck, None)
            elif ok is not None:
                stored.append(ok)
        for idx in self._indexes[1:]:
            idx.drain_events()
        if self.events is not None:
            if stored:
                self.events.append(OffloadingEvent(stored, self.medium, False))
            if removed:
                self.events.append(OffloadingEvent(removed, self.medium, True))
        return removed

    # -- OffloadingManager ---------------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        self._bump("lookups")
        self._bump_group(key, "lookups")
        cks = [self._ck(key, s) for s in range(len(self._indexes))]
        if all(idx.contains(ck) for idx, ck in zip(self._indexes, cks)):
            self._okey.setdefault(cks[0], key)
            self._count_hit(key)
            return LookupResult.HIT
        if any(idx.in_flight(ck) for idx, ck in zip(self._indexes, cks)):
            self._bump("pending_hits")
            return LookupResult.HIT_PENDING
        return LookupResult.MISS

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> DiskLoadSpec:
        keys = list(keys)
        token = self._token("l")
        chunks: list[list[Optional[tuple]]] = []
        pinned: list[list[Optional[DiskEntry]]] = []
        for s, idx in enumerate(self._indexes):
            entries = idx.begin_read([self._ck(k, s) for k in keys])
            pinned.append(entries)
            chunks.append([entry_to_wire(e) for e in entries])
        for i, k in enumerate(keys):
            self._loads.setdefault(k, []).append((token, [pinned[s][i] for s in range(len(self._indexes))]))
        self._load_tokens[token] = keys
        self._bump("loads")
        return DiskLoadSpec(token, chunks, self._groups_of(keys))

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for s, idx in enumerate(self._indexes):
            # A read pin taken and dropped at once: marks the chunks most recently used.
            idx.end_read([e for e in idx.begin_read([self._ck(k, s) for k in keys]) if e is not None])

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        keys = set(keys)
        # Every load job on these keys: two requests may load one key at once, and vLLM names the
        # keys, not the job, so each job's result is read as soon as it is there.
        tokens = [t for t, ks in self._load_tokens.items() if not keys.isdisjoint(ks)]
        unpin: dict[int, list[DiskEntry]] = {}
        released: list[tuple[OffloadKey, list[Optional[DiskEntry]]]] = []
        for k in keys:
            stack = self._loads.get(k)
            if not stack:
                continue
            # Prefer the pin of a job whose keys are all finishing now (both pins name the same entry).
            i = next((i for i, (t, _) in enumerate(stack) if set(self._load_tokens.get(t, ())) <= keys), 0)
            _, entries = stack.pop(i)
            released.append((k, entries))
            if not stack:
                del self._loads[k]
            for s, e in enumerate(entries):
                if e is not None:
                    unpin.setdefault(s, []).append(e)
        bad, unloaded = self._load_results(tokens)
        n_bad = 0
        for s in set(unpin) | set(bad):
            entries = unpin.get(s, [])
            # Drop what a job found bad, whichever job's pin is released now.
            drop = [e for e in (self._indexes[s].entry(CacheEngineKey.from_string(k)) for k in bad.get(s, ()))
                    if e is not None]
            n_bad += len(drop)
            self._indexes[s].end_read(entries, drop)
        loaded = 0
        for k, entries in released:
            if any(e is None or e.key.to_string() in bad.get(s, ()) or e.key.to_string() in unloaded
                   for s, e in enumerate(entries)):
                continue
            loaded += 1
            self._count_loaded(k, sum(e.nbytes for e in entries))
        if n_bad:
            self._bump("load_failures", n_bad)
            log.warning("%d chunk(s) failed to load (corrupt or unreadable): dropped, vLLM recomputes them", n_bad)
        self._drain()
        self._write_stats()

    def _load_results(self, tokens: list[str]) -> tuple[dict[int, set[str]], set[str]]:
        """Per shard, the chunk keys the load jobs ``tokens`` found bad, and the chunk keys a worker
        did not land, corrupt or not (each job's result read once)."""
        bad: dict[int, set[str]] = {}
        unloaded: set[str] = set()
        for token in tokens:
            # A job's result is there once its worker reported it: read each job's exactly once.
            got = [take_result(self.root, token, s) for s in range(len(self._indexes))]
            if all(r is not None for r in got):
                del self._load_tokens[token]
                self._reporter.observe_seconds("load", max((r.get("seconds") or 0 for r in got), default=None))
            self._on_load_result(token, got)
            for s, res in enumerate(got):
                if res and res.get("bad"):
                    bad.setdefault(s, set()).update(res["bad"])
                if res:
                    unloaded.update(res.get("failed", ()))
        return bad, unloaded

    def _on_load_result(self, token: str, results: list[Optional[dict]]) -> None:
        """Each shard's result of load job ``token`` as it is read (None: not there yet); for subclasses."""

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> Optional[PrepareStoreOutput]:
        keys = list(dict.fromkeys(keys))
        n = len(self._indexes)
        res = [idx.reserve([self._ck(k, s) for k in keys], [self._chunk_phys] * len(keys))
               for s, idx in enumerate(self._indexes)]
        got = [{ck: (off, size) for ck, off, size in zip(r.keys, r.offsets, r.sizes)} for r in res]
        todo, extents, refused = [], [[] for _ in range(n)], []
        for k in keys:
            cks = [self._ck(k, s) for s in range(n)]
            if all(ck in g for ck, g in zip(cks, got)):
                todo.append(k)
                for s, ck in enumerate(cks):
                    off, size = got[s][ck]
                    extents[s].append((ck.to_string(), off, size))
                continue
            # Not stored here: give back what the other shards reserved for it.
            for s, ck in enumerate(cks):
                if ck in got[s]:
                    self._indexes[s].abort([ck])
            if any(ck in r.errors for ck, r in zip(cks, res)):
                refused.append(k)
        evicted = self._drain()
        if refused:
            self._bump("store_refused", len(refused))
        if refused and not todo:
            self._write_stats()
            return None
        token = self._token("s")
        for k in todo:
            self._okey[self._ck(k, 0)] = k
            self._pending_store[k] = token
        if todo:
            self._stores[token] = (todo, extents)
        self._write_stats()
        return PrepareStoreOutput(keys_to_store=todo, store_spec=DiskStoreSpec(token, extents, self._groups_of(todo)),
                                  evicted_keys=evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        tokens = {self._pending_store[k] for k in keys if k in self._pending_store}
        for token in tokens:
            self._finish_store(token, success)
        self._drain()
        self._write_stats()

    def _finish_store(self, token: str, success: bool) -> None:
        todo, extents = self._stores.pop(token, ([], []))
        for k in todo:
            self._pending_store.pop(k, None)
        ok_all = 0
        seconds = []
        for s, idx in enumerate(self._indexes):
            cks = [self._ck(k, s) for k in todo]
            res = take_result(self.root, token, s) if success else None
            done, failed, done_keys = [], [], []
            written = {} if res is None else res.get("chunks", {})
            if res is not None and res.get("seconds") is not None:
                seconds.append(res["seconds"])
            for k, ck, (_, off, phys) in zip(todo, cks, extents[s]):
                w = written.get(ck.to_string())
                e = None if w is None else entry_from_stored(ck, off, phys, w)
                if e is None:
                    failed.append(ck)
                else:
                    done.append(e)
                    done_keys.append(k)
            try:
                idx.commit(done, failed)
            except OSError as exc:  # the index append failed: nothing was recorded
                log.warning("cannot record %d stored chunk(s): %s", len(done), exc)
                idx.abort([e.key for e in done])
                done, done_keys = [], []
            if s == 0:
                ok_all = len(done)
            for k, e in zip(done_keys, done):
                if s == 0:
                    self._bump_group(k, "chunks_stored")
                self._bump_group(k, "bytes_stored", e.nbytes)
                self._bump("bytes_stored", e.nbytes)
        if seconds:
            self._reporter.observe_seconds("store", max(seconds))
        self._bump("stores")
        self._bump("chunks_stored", ok_all)
        if ok_all < len(todo):
            self._bump("store_failures", len(todo) - ok_all)
            log.warning("%d of %d chunk(s) of a store were not written; they stay uncached",
                        len(todo) - ok_all, len(todo))

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events is None:
            return ()
        out, self.events = self.events, []
        return out

    def on_schedule_end(self, context) -> None:
        self._write_stats()

    def get_stats(self):
        """What changed since vLLM last asked (``metrics``): empty when nothing did, never None."""
        return self._reporter.take(self.stats, self.group_stats, len(self._indexes[0]) if self._indexes else 0)

    def reset_cache(self) -> None:
        """Drop every chunk not being read or written (after a weight update the KV is stale)."""
        for idx in self._indexes:
            for ck in idx.keys():
                _, extent = idx.remove(ck)
                if extent is not None:
                    idx.free(extent[0])
        self._drain()
        self._write_stats()

    def shutdown(self) -> None:
        """Snapshot each index and release the directories (idempotent)."""
        try:
            self._write_stats()
        except Exception:  # noqa: BLE001 - shutdown must release the locks
            pass
        for idx in getattr(self, "_indexes", []):
            try:
                idx.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing the disk index: %s", e)
        for d in getattr(self, "_dirs", []):
            d.release()
        self._indexes, self._dirs = [], []

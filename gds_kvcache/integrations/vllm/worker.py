"""``DiskOffloadingWorker``: moves vLLM KV blocks between the paged cache and the pool files.

Runs in each vLLM worker process. It never opens the index: the scheduler
side (``DiskOffloadingManager``) decided every extent, and a job's result
(checksums of what was written, chunks found corrupt, how long the job
took) goes back through ``channel``. Blocks are gathered into slab chunks
with the library's pack kernel, one KV cache group per chunk (``layout``:
each canonical KV tensor of the group is one "layer" of an MLA-style paged
view, one row of ``page`` bytes per block), written and read with
``DiskTransfer`` (few large transfers per job, checksums in one launch),
and scattered back with unpack. With a CUDA cache the slab is GPU memory,
so KvikIO/GDS moves the bytes between GPU memory and NVMe directly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import GPULoadStoreSpec

try:
    from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult
except ImportError:  # a GPU test machine without vLLM drives the worker directly
    from dataclasses import dataclass

    OffloadingWorker = object  # type: ignore[misc,assignment]

    @dataclass
    class TransferResult:  # type: ignore[no-redef]
        """Stand-in for vLLM's TransferResult (same fields)."""

        job_id: int
        success: bool
        transfer_size: int | None = None
        transfer_time: float | None = None

from ...config import CacheEngineConfig
from ...errors import GdsKvCacheError, ShapeMismatchError, StorageUnavailableError
from ...io import open_engine
from ...kernels import pack, unpack
from ...kernels.checksum import checksum_batch, warmup_cuda
from ...memory.allocator import SlabMemoryAllocator
from ...memory.format import MemoryFormat
from ...storage.pool_file import LAYOUT_NAME, PoolLayout
from ...storage.transfer import DiskTransfer
from .amx import allow_amx
from .channel import JOBS_DIR, write_result
from .fleet_worker import ReadOnlyPools, load_groups, store_path
from .layout import GroupLayout, chunk_blocks, group_layouts
from .specs import DiskLoadSpec, DiskStoreSpec, entry_from_wire, stored_fields

__all__ = ["DiskOffloadingWorker"]

log = logging.getLogger(__name__)


class DiskOffloadingWorker(OffloadingWorker):
    """Store and load jobs of one worker rank, on a background thread.

    Parameters
    ----------
    kv_caches
        vLLM's canonical KV caches of this rank.
    root
        The plug-in's directory (``rank<s>`` shards and ``jobs``).
    store_shard, load_shard
        Shard this rank writes and reads (its rank; 0 for every rank where
        ranks hold identical bytes).
    blocks_per_chunk
        GPU blocks per offloaded chunk.
    config
        I/O settings (``io_engine``, ``io_threads``, ``memory_device``, ``slab_size``, ``verify_checksums``).

    Notes
    -----
    A load that finds a chunk missing, unreadable or corrupt completes with
    ``success=True`` and its blocks in ``take_failed_blocks()`` when
    ``reports_failed_blocks`` is set (``GdsKvCacheConnector`` sets it and
    hands them to vLLM, which recomputes them); otherwise the job reports
    ``success=False``, which vLLM's plain connector treats as fatal. Never
    is a block left holding bytes that were not verified.
    """

    def __init__(self, kv_caches, root: str, store_shard: int, load_shard: int,
                 blocks_per_chunk: int, config: CacheEngineConfig, expected_block_bytes: int = 0):
        self.root = os.path.abspath(root)
        self.store_shard, self.load_shard = store_shard, load_shard
        self.bpc = blocks_per_chunk
        self.config = config
        self.groups: list[GroupLayout] = group_layouts(kv_caches)
        for g, lay in enumerate(self.groups):
            # The scheduler reserves expected_block_bytes per block for every chunk.
            if expected_block_bytes and lay.block_bytes > expected_block_bytes:
                log.warning("KV cache group %d moves %d bytes per block, more than the %d vLLM counts: its "
                            "chunks do not fit their extents and are not stored", g, lay.block_bytes,
                            expected_block_bytes)
        dev = self.groups[0].views[0].device
        self.device = dev
        if dev.type == "cpu":
            allow_amx()
        kind = "cuda" if dev.type == "cuda" else "host"
        if config.memory_device in ("pinned", "host") and dev.type == "cpu":
            kind = config.memory_device
        self.allocator = SlabMemoryAllocator(config.slab_bytes, kind, dev.index or 0)
        self.reports_failed_blocks = False
        os.makedirs(os.path.join(self.root, JOBS_DIR), exist_ok=True)
        self._pools: dict[str, DiskTransfer] = {}
        self._pool_ids: dict[str, tuple] = {}  # path -> identity of the layout file it was opened with
        # Fleet mode: other instances' pools, read-only (``fleet_worker``).
        self._remote = ReadOnlyPools(config, self.allocator) if config.lookup_server_url else None
        self._pool_lock = threading.Lock()
        self._jobs: dict[int, Future] = {}
        self._failed: set[int] = set()
        self._failed_lock = threading.Lock()
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="gds-kvcache-vllm")
        self.stats = {"stores": 0, "chunks_stored": 0, "loads": 0, "chunks_loaded": 0, "load_failures": 0,
                      "blocks_failed": 0, "chunks_too_big": 0}
        # On the thread that runs the jobs: Numba's parallel layer sets up per calling thread.
        self._exec.submit(self._warm_up).result()
        self._open_existing_pools()

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) pack, unpack and the batch checksum that transfers use
        now, not inside the first request's transfers: once per group (page sizes may pick other
        kernels). Touches no KV: unpack of slot -1 writes nothing."""
        for lay in self.groups:
            objs = self.allocator.batched_allocate([lay.chunk_shape(1)], [torch.int8], [MemoryFormat.KV_MLA_FMT])
            if not objs:
                return
            try:
                pack(lay.views, "mla", self._slots([0]), objs[0].tensor, check=False)
                unpack(objs[0].tensor, lay.views, "mla", self._slots([-1]), check=False)
                self._sync()
                checksum_batch(objs[0].slab.tensor, [(objs[0].offset, objs[0].nbytes)], ordered=False)
            finally:
                objs[0].ref_count_down()
        if self.device.type == "cuda":
            warmup_cuda(self.device)

    def _open_existing_pools(self) -> None:
        """Open the pools a restart finds now, at start-up: opening one (KvikIO, cuFile's driver,
        registering the slab) is what otherwise made the first load after a restart slow (the
        process that wrote the chunks paid it at its first store). A new directory's pool is made
        by the scheduler later and is opened at its first use."""
        for shard in sorted({self.store_shard, self.load_shard}):
            if not os.path.exists(os.path.join(self.root, f"rank{shard}", LAYOUT_NAME)):
                continue
            try:
                self._pool(shard)
            except GdsKvCacheError as e:  # the first job tries again and fails that job, not the engine
                log.warning("cannot open shard %d's pool at start-up: %s", shard, e)

    # -- plumbing -------------------------------------------------------------
    def _pool(self, shard: int) -> DiskTransfer:
        """The shard's pool (see ``_pool_at``)."""
        return self._pool_at(os.path.join(self.root, f"rank{shard}"))

    def _pool_at(self, path: str) -> DiskTransfer:
        """The pool of directory ``path`` (a shard's, or this instance's writer directory in fleet
        mode): opened at start-up or first use (the scheduler creates it, maybe after this worker),
        and again when the scheduler rewrote its layout file since (a restart with another
        ``max_local_disk_size`` resizes the pool after this worker opened it)."""
        try:
            st = os.stat(os.path.join(path, LAYOUT_NAME))
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            ident = None
        with self._pool_lock:
            p = self._pools.get(path)
            if p is not None and ident is not None and ident != self._pool_ids.get(path):
                log.info("the pool layout of %s changed: reopening it", path)
                del self._pools[path]
                p.engine.close()
                p = None
            if p is None:
                try:
                    layout = PoolLayout.read(path)
                except StorageUnavailableError as e:
                    raise StorageUnavailableError(f"{e}; the vLLM scheduler creates it: was it started with "
                                                  "the same local_disk?") from None
                eng = open_engine(layout.pool_paths, self.config, self.allocator.kind, layout.stripe_bytes)
                eng.attach(self.allocator.buffer)
                p = DiskTransfer(eng, layout)
                self._pools[path] = p
                self._pool_ids[path] = ident
            return p

    def _slots(self, ids) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.int64, device=self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @property
    def open_pools(self) -> list[int]:
        """The shards whose pool (``root/rank<s>``) this worker holds open."""
        with self._pool_lock:
            return sorted(s for s in {self.store_shard, self.load_shard}
                          if os.path.join(self.root, f"rank{s}") in self._pools)

    def take_failed_blocks(self) -> set[int]:
        """GPU block ids whose load failed since the last call (for vLLM's invalid_block_ids)."""
        with self._failed_lock:
            out, self._failed = self._failed, set()
        return out

    # -- OffloadingWorker ------------------------------------------------------
    def submit_store(self, job_id: int, src_spec: "GPULoadStoreSpec", dst_spec: DiskStoreSpec) -> bool:
        self._jobs[job_id] = self._exec.submit(self._store, job_id, src_spec, dst_spec)
        return True

    def submit_load(self, job_id: int, src_spec: DiskLoadSpec, dst_spec: "GPULoadStoreSpec",
                    expedited: bool = False) -> bool:
        # vLLM 0.33 marks loads it waits for within the step ``expedited``; jobs run in order here.
        self._jobs[job_id] = self._exec.submit(self._load, job_id, src_spec, dst_spec)
        return True

    def get_finished(self) -> list[TransferResult]:
        out = []
        for job_id in [j for j, f in self._jobs.items() if f.done()]:
            out.append(self._jobs.pop(job_id).result())
        return out

    def wait(self, job_ids: set[int]) -> None:
        for j in job_ids:
            f = self._jobs.get(j)
            if f is not None:
                f.exception()  # waits; the result stays for get_finished

    def shutdown(self) -> None:
        self._exec.shutdown(wait=True)
        for tr in self._pools.values():
            tr.engine.close()
        self._pools.clear()
        if self._remote is not None:
            self._remote.close()
        self.allocator.close()

    # -- jobs -------------------------------------------------------------------
    def _chunk_blocks(self, spec: "GPULoadStoreSpec", groups, nchunks: int) -> list[list[tuple[int, int]]]:
        """Per chunk of the job, ``(sub-block index, GPU block id)`` of its blocks in ``spec``."""
        if groups is not None and any(not 0 <= g < len(self.groups) for g in groups):
            raise ShapeMismatchError(f"the spec names KV cache groups {sorted(set(groups))}; this worker has "
                                     f"{len(self.groups)}")
        return chunk_blocks(spec, groups, nchunks, self.bpc)

    def _group(self, groups, j: int) -> GroupLayout:
        return self.groups[groups[j] if groups is not None else 0]

    def _store(self, job_id: int, src: "GPULoadStoreSpec", dst: DiskStoreSpec) -> TransferResult:
        t0 = time.perf_counter()
        extents = dst.extents[self.store_shard] if self.store_shard < len(dst.extents) else []
        groups = getattr(dst, "groups", None)
        written: dict[str, dict] = {}
        objs = []
        try:
            transfer = self._pool_at(store_path(self.root, dst, self.store_shard))
            blocks = self._chunk_blocks(src, groups, len(extents))
            # A chunk is stored from its first block on; one whose first blocks vLLM left out (a
            # sliding window's edge inside a chunk) stays uncached rather than half written.
            todo = [(j, e, b) for j, (e, b) in enumerate(zip(extents, blocks))
                    if b and [sub for sub, _ in b] == list(range(len(b)))]
            objs = self.allocator.batched_allocate([self._group(groups, j).chunk_shape(len(b)) for j, _, b in todo],
                                                   [torch.int8] * len(todo), [MemoryFormat.KV_MLA_FMT] * len(todo))
            fit = []
            for o, (j, e, b) in zip(objs, todo):
                if o.phys_size > e[2]:  # never past the extent the scheduler reserved
                    self.stats["chunks_too_big"] += 1
                    continue
                pack(self._group(groups, j).views, "mla", self._slots(bid for _, bid in b), o.tensor, check=False)
                fit.append((o, e))
            self._sync()
            sums, errs = transfer.write_checksummed([o for o, _ in fit], [e[1] for _, e in fit],
                                                    [e[0] for _, e in fit])
            for (o, e), err, s in zip(fit, errs, sums):
                if err is None:
                    written[e[0]] = stored_fields(o, s)
                else:
                    log.warning("store of %s failed: %s", e[0], err)
        except Exception as e:  # noqa: BLE001 - a failed store is an uncached chunk, never a crash
            log.warning("store job %d failed: %s", job_id, e)
        finally:
            for o in objs:
                o.ref_count_down()
        dt = time.perf_counter() - t0
        # Written before the job is reported done: the scheduler reads it at complete_store (and
        # records nothing of a job whose result it cannot read).
        try:
            write_result(self.root, dst.token, self.store_shard, {"chunks": written, "seconds": dt})
        except OSError as e:
            log.warning("store job %d: cannot publish its result (%s); its chunks stay uncached", job_id, e)
            written = {}
        self.stats["stores"] += 1
        self.stats["chunks_stored"] += len(written)
        nbytes = sum(w["nbytes"] for w in written.values())
        return TransferResult(job_id, True, nbytes, dt)

    def _load(self, job_id: int, src: DiskLoadSpec, dst: "GPULoadStoreSpec") -> TransferResult:
        t0 = time.perf_counter()
        chunks = src.chunks[self.load_shard] if self.load_shard < len(src.chunks) else []
        groups = getattr(src, "groups", None)
        failed_chunks: set[int] = set(range(len(chunks)))
        blocks: list[list[tuple[int, int]]] = [[] for _ in chunks]
        bad: list[str] = []
        nbytes = 0
        try:
            blocks = self._chunk_blocks(dst, groups, len(chunks))
            budget = max(1, self.allocator.capacity // 2)
            for transfer, want, deadline in load_groups(src, self.load_shard, chunks, blocks, self._pool_at,
                                                        lambda: self._pool(self.load_shard), self._remote):
                i = 0
                while i < len(want):
                    batch, size = [], 0
                    while i < len(want) and (not batch or size + chunks[want[i]][3] <= budget):
                        batch.append(want[i])
                        size += chunks[want[i]][3]
                        i += 1
                    got = self._load_batch(transfer, chunks, blocks, groups, batch, bad, deadline)
                    if not got and batch:
                        break  # no slab room (or the leases ended): the rest fails (and is recomputed)
                    failed_chunks -= got
                    nbytes += sum(chunks[j][2] for j in got)
            self._sync()
        except Exception as e:  # noqa: BLE001 - reported as failed blocks below
            log.warning("load job %d failed: %s", job_id, e)
        dt = time.perf_counter() - t0
        try:
            write_result(self.root, src.token, self.load_shard,
                         {"bad": bad, "failed": [str(chunks[j][0]) for j in sorted(failed_chunks) if chunks[j]],
                          "seconds": dt})
        except OSError as e:  # the blocks still fail below; the scheduler drops the chunks at a later load
            log.warning("load job %d: cannot publish its result: %s", job_id, e)
        self.stats["loads"] += 1
        self.stats["chunks_loaded"] += len(chunks) - len(failed_chunks)
        failed_blocks = {b for j in failed_chunks for _, b in blocks[j]}
        if failed_blocks:
            self.stats["load_failures"] += 1
            self.stats["blocks_failed"] += len(failed_blocks)
            log.warning("load job %d: %d of %d chunk(s) failed; %d block(s) to recompute", job_id,
                        len(failed_chunks), len(chunks), len(failed_blocks))
            if not self.reports_failed_blocks:
                return TransferResult(job_id, False, nbytes, dt)
            with self._failed_lock:
                self._failed |= failed_blocks
        return TransferResult(job_id, True, nbytes, dt)

    def _load_batch(self, transfer: DiskTransfer, chunks, blocks, groups, batch: list[int], bad: list[str],
                    deadline: float | None = None) -> set[int]:
        """Read, verify and unpack the chunks ``batch``; the indexes that landed. Past ``deadline``
        (another instance's chunks: the end of their leases) nothing read is trusted."""
        descs = []
        for j in batch:
            try:
                descs.append(entry_from_wire(chunks[j]))
            except (ValueError, TypeError, GdsKvCacheError) as e:
                log.warning("load spec item %r unusable: %s", chunks[j][:1], e)
                bad.append(str(chunks[j][0]))
                descs.append(None)
        usable = [(j, d) for j, d in zip(batch, descs) if d is not None]
        got = transfer.read_verified(self.allocator, [d for _, d in usable],
                                     self.config.verify_checksums or deadline is not None)
        if deadline is not None and time.time() > deadline:
            # The leases ended before the check: the writer may have reused an extent, so a failed
            # checksum says nothing about the chunk and a good one is not trusted.
            log.warning("load of %d chunk(s) of another instance outlived its leases: recomputed", len(usable))
            for o in got.objs:
                if o is not None:
                    o.ref_count_down()
            return set()
        for i, why in got.bad:
            log.warning("chunk %s failed to load (%s): dropped, its blocks are recomputed", usable[i][1].key.to_string(),
                        why)
            bad.append(usable[i][1].key.to_string())
        landed: set[int] = set()
        try:
            for (j, d), o in zip(usable, got.objs):
                if o is None:
                    continue
                lay = self._group(groups, j)
                if o.shape[1] != len(lay.views) or o.shape[3] != lay.page:
                    log.warning("chunk %s has shape %s, not one of KV cache group %d: its blocks are recomputed",
                                d.key.to_string(), tuple(o.shape), groups[j] if groups is not None else 0)
                    continue
                nstored = o.shape[2]
                slots = [-1] * nstored
                for sub, b in blocks[j]:
                    if sub >= nstored:
                        break
                    slots[sub] = b
                else:
                    unpack(o.tensor, lay.views, "mla", self._slots(slots), check=False)
                    landed.add(j)
                    continue
                log.warning("chunk %s holds %d block(s), fewer than the load needs", d.key.to_string(), nstored)
            self._sync()
        finally:
            for o in got.objs:
                if o is not None:
                    o.ref_count_down()
        return landed

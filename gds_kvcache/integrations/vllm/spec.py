"""``GdsKvCacheSpec``: the ``OffloadingSpec`` vLLM builds from ``kv_connector_extra_config``.

Keys read from ``kv_connector_extra_config`` (besides vLLM's own
``spec_name``/``spec_module_path``/``blocks_per_chunk``):

``local_disk`` (required)
    The plug-in's directory; shard ``s`` (tensor-parallel rank, or 0 for
    all ranks of an MLA model) is the library directory ``local_disk/rank<s>``.
``max_local_disk_size`` (required)
    Disk budget in GB of each shard directory, index included.
``pool_files``, ``io_engine``, ``io_threads``, ``memory_device``, ``verify_checksums``
    As in ``CacheEngineConfig``.
``slab_size``
    GB of staging memory per worker (default 0.5): GPU memory for a CUDA
    cache (GDS reads and writes it directly), host memory otherwise.
``lookup_url`` (or ``lookup_server_url``)
    Fleet mode: the Redis server every vLLM instance sharing ``local_disk``
    uses as its index (``fleet_manager``); ``writer_id``, ``lease_ttl``,
    ``claim_ttl``, ``shared_tick``, ``redis_socket_timeout`` and
    ``redis_backoff`` as in ``CacheEngineConfig``. Without it nothing
    changes: one instance per ``local_disk``.

``settings`` checks them before the model loads (``library_config``).
The spec declares the plug-in's metrics to vLLM (``metrics``), and passes
the offloaded KV cache groups to the manager (one chunk per group and
offload key; ``layout`` says which bytes).
"""

from __future__ import annotations

import logging

from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingSpec
from vllm.v1.kv_offload.config import OffloadingConfig

from . import metrics
from .manager import DiskOffloadingManager, KeyMaker
from .settings import check_vllm_version, library_config
from .worker import DiskOffloadingWorker

__all__ = ["GdsKvCacheSpec", "library_config"]

log = logging.getLogger(__name__)

class GdsKvCacheSpec(OffloadingSpec):
    """vLLM offloading tier on local NVMe: capacity-bounded, checksummed, persistent across restarts.

    Notes
    -----
    Enable with ``spec_name: "GdsKvCacheSpec"`` and ``spec_module_path:
    "gds_kvcache.integrations.vllm"`` in ``kv_connector_extra_config`` (see
    the README for the full line). The scheduler process holds the index of
    each shard directory (and its lock), so start one vLLM instance per
    ``local_disk``. Restarting on the same directory keeps every chunk.
    """

    @classmethod
    def build_metric_definitions(cls, extra_config):
        """The plug-in's counters for vLLM's Prometheus ``/metrics`` (``metrics.definitions``)."""
        return metrics.definitions()

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        check_vllm_version()
        self.lib_config = library_config(dict(self.extra_config))
        self.root = self.lib_config.local_disk
        par = config.parallel
        # Ranks that hold identical bytes (MLA under pure TP) share shard 0, written by rank 0 only
        # (vLLM's connector skips stores on the other ranks when this is set).
        self.replicated_layout = bool(config.replicated_layout)
        self.shards = 1 if self.replicated_layout else max(1, par.world_size)
        self.rank = par.rank
        geometry = "|".join(str(x) for x in (config.model.dtype, config.worker_kv_bytes_per_block,
                                             self.blocks_per_chunk, self.tokens_per_block, config.kv_cache_layout,
                                             int(self.replicated_layout)))
        self.key_maker = KeyMaker(config.model.name, geometry, self.shards)
        self._manager = None
        self._worker = None

    def get_manager(self) -> DiskOffloadingManager:
        if self._manager is None and self.lib_config.lookup_server_url:
            from .fleet_manager import FleetOffloadingManager   # fleet mode: lookup_url set
            self._manager = FleetOffloadingManager(
                self.root, self.shards, self.config.worker_kv_bytes_per_block * self.blocks_per_chunk,
                self.key_maker, self.lib_config, enable_events=self.kv_events_config.enable_kv_cache_events)
        if self._manager is None:
            self._manager = DiskOffloadingManager(
                self.root, self.shards, self.lib_config.disk_bytes, self.lib_config.pool_files,
                self.config.worker_kv_bytes_per_block * self.blocks_per_chunk, self.key_maker,
                enable_events=self.kv_events_config.enable_kv_cache_events)
        # Whichever manager was made: each chunk is one group's (the key names it, the specs tell the workers).
        self._manager.set_groups([(g.group_id, g.tokens_per_block * self.blocks_per_chunk) for g in self.config.groups])
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> DiskOffloadingWorker:
        if self._worker is None:
            shard = 0 if self.replicated_layout else self.rank
            self._worker = DiskOffloadingWorker(kv_caches, self.root, shard, shard, self.blocks_per_chunk,
                                                self.lib_config, self.config.worker_kv_bytes_per_block)
        return self._worker

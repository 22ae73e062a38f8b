"""``GdsKvCacheConnector``: vLLM's ``OffloadingConnector`` that reports failed loads as failed blocks.

vLLM 0.32's ``OffloadingConnector`` treats any failed transfer as fatal.
This subclass lets the disk tier's worker hand the blocks of a chunk that
was missing, unreadable or corrupt to vLLM's ``invalid_block_ids``: with
``kv_load_failure_policy: "recompute"`` the scheduler recomputes them, so
the request completes with the right output instead of the engine stopping.
"""

from __future__ import annotations

import logging

from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector

__all__ = ["GdsKvCacheConnector"]

log = logging.getLogger(__name__)


class GdsKvCacheConnector(OffloadingConnector):
    """``OffloadingConnector`` plus ``get_block_ids_with_load_errors`` from the disk tier's worker."""

    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        policy = getattr(vllm_config.kv_transfer_config, "kv_load_failure_policy", "fail")
        if policy != "recompute":
            log.warning("kv_load_failure_policy is %r: a chunk that fails its checksum fails its request; "
                        "set \"kv_load_failure_policy\": \"recompute\" to recompute it instead", policy)

    def register_kv_caches(self, kv_caches) -> None:
        super().register_kv_caches(kv_caches)
        worker = self.connector_worker.worker if self.connector_worker is not None else None
        if worker is not None and hasattr(worker, "reports_failed_blocks"):
            worker.reports_failed_blocks = True

    def get_block_ids_with_load_errors(self) -> set[int]:
        worker = self.connector_worker.worker if self.connector_worker is not None else None
        take = getattr(worker, "take_failed_blocks", None)
        return take() if take is not None else set()

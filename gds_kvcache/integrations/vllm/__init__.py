"""vLLM plug-in: the disk tier as a vLLM KV offloading tier, enabled by one config line.

``GdsKvCacheSpec`` is the ``OffloadingSpec`` that vLLM's ``OffloadingConnector``
loads from ``spec_module_path``; ``GdsKvCacheConnector`` is that connector plus
reporting of failed loads as failed blocks (so vLLM recomputes them). Use the
connector (``kv_connector_module_path``) unless you cannot: with the plain
``OffloadingConnector`` a chunk that fails its checksum stops the engine
instead of being recomputed.

Notes
-----
Needs vLLM 0.32 or 0.33 (``pip install gds_kvcache[vllm]``); importing this
package without vLLM raises ``ImportError``.
"""

from .connector import GdsKvCacheConnector
from .manager import DiskLoadSpec, DiskOffloadingManager, DiskStoreSpec
from .spec import GdsKvCacheSpec
from .worker import DiskOffloadingWorker

__all__ = ["GdsKvCacheSpec", "GdsKvCacheConnector", "DiskOffloadingManager", "DiskOffloadingWorker",
           "DiskLoadSpec", "DiskStoreSpec"]

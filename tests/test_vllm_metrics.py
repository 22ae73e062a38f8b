"""The plug-in's counters in a real vLLM API server's Prometheus ``/metrics``, nonzero after traffic.

One ``python -m vllm.entrypoints.openai.api_server`` with the plug-in on a small disk budget: prompts
that overflow it (stores, evictions), then after ``/reset_prefix_cache`` the last prompt again (lookups,
hits, loads), then, with every stored chunk's bytes flipped on disk, once more (load failures, recomputed).
Every metric the plug-in declares must be listed; those the traffic drove must be above zero and agree
with the totals in ``vllm-stats.json``. Needs vLLM (``scripts/ci-vllm.sh``); skipped without it.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

BLOCK, PROMPT_LEN = 32, 640


def _need_vllm():
    """The plug-in's metrics module (vLLM's import chain warns on this torch: not our warnings)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("vllm")
        pytest.importorskip("transformers")
        from gds_kvcache.integrations.vllm import metrics
    return metrics


def _model(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def _flip_every_chunk(shard: str) -> int:
    """XOR one byte of every 4 KiB page of the pool files' written data (every chunk is 4 KiB aligned)."""
    from gds_kvcache.storage.pool_file import POOL_NAME

    n = 0
    for name in sorted(os.listdir(shard)):
        if not name.startswith(POOL_NAME):
            continue
        path = os.path.join(shard, name)
        with open(path, "r+b") as f:
            end = os.fstat(f.fileno()).st_size
            off = 0
            while off < end:
                try:
                    data_at = os.lseek(f.fileno(), off, os.SEEK_DATA)   # skip the sparse file's holes
                except OSError:   # ENXIO: no data past off
                    break
                f.seek(data_at + 17)
                b = f.read(1)
                if b:
                    f.seek(data_at + 17)
                    f.write(bytes([b[0] ^ 0x5A]))
                    n += 1
                off = (data_at // 4096 + 1) * 4096
    return n


def _total(samples, name, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


@pytest.mark.slow
def test_plugin_counters_in_vllm_prometheus_metrics(tmp_path):
    metrics = _need_vllm()
    from gds_kvcache.bench.vllm_server import ApiServer, transfer_config

    model = _model(str(tmp_path / "model"))
    root = str(tmp_path / "kv")
    # 2 layers x 2 KV heads x 64 x 2 (K, V) x 2 bytes = 1 KiB per token: 32 KiB chunks, 20 per prompt.
    kv = transfer_config(root, max_local_disk_size=0.002, io_engine="posix", io_threads=2, slab_size=0.05,
                         pool_files=1)
    server = ApiServer(model, str(tmp_path / "server.log"), kv, block_size=BLOCK)
    try:
        server.wait_ready()
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 500) for _ in range(PROMPT_LEN)] for _ in range(6)]
        for p in prompts:  # ~2.5 MB of chunks into a 2 MB budget: evictions
            server.complete([p], 2)
        time.sleep(2.0)
        server.complete([[1] * 8], 1)
        server.reset_prefix_cache()
        again = server.complete([prompts[-1]], 2)
        cached = int((again["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        assert cached >= BLOCK, server.tail()
        time.sleep(1.0)
        server.reset_prefix_cache()
        assert _flip_every_chunk(os.path.join(root, "rank0")) > 0
        server.complete([prompts[-1]], 2)   # every chunk fails its checksum: recomputed
        time.sleep(1.0)
        server.complete([[1] * 8], 1)       # one more step: its stats carry the last counts
        time.sleep(2.0)
        text = server.call("/metrics", raw=True)
        samples = server.metrics()
    finally:
        server.stop()
    with open(os.path.join(root, "vllm-stats.json")) as f:
        totals = json.load(f)

    for name in metrics.definitions():
        assert f"# HELP {name}" in text or f"# HELP {name}_total" in text, f"{name} not in /metrics"
    # What the traffic drove, above zero and equal to the manager's totals.
    for key in ("lookups", "load_failures", "evictions"):   # store failures and the fleet's are not driven here
        name = metrics.COUNTERS[key][0]
        got = _total(samples, f"{name}_total")
        assert got > 0 and got == totals[key], (name, got, totals)
    for key, (name, _) in metrics.GROUP_COUNTERS.items():
        got = _total(samples, f"{name}_total", group="0")
        assert got > 0 and got == totals["groups"]["0"][key], (name, got, totals)
    for name, _ in metrics.HISTOGRAMS.values():
        assert _total(samples, f"{name}_count") > 0, name
    assert _total(samples, metrics.DISK_CHUNKS[0]) == totals["chunks"] > 0
    # vLLM's own offload counters move with ours.
    assert _total(samples, "vllm:kv_offload_load_bytes_total") > 0
    assert totals["load_failures"] > 0 and totals["evictions"] > 0

"""Layer-wise loading against serial load-then-compute: time to first token over a partly cached prompt.

A random-weight Llama-3-8B-shaped model (``ttft.build_model``) and a prompt of
``--cached`` tokens already seen plus ``--new`` new ones. The cached part is
prefilled once and stored with ``CacheEngine.store_layer`` from hooks on the
decoder layers (each layer's KV is copied into a vLLM-layout paged cache and
handed over as the layer finishes). Then, per storage format (``layered``:
``use_layerwise``, one object per chunk and layer; ``whole``: one object per
chunk), each timed run opens a new ``CacheEngine`` on the directory (a
restart: nothing in the hot tier) and measures, synchronised:

a. load alone: ``retrieve_layer`` advanced to its end;
b. compute alone: the forward over the new tokens and the last position's
   logits, the cache already loaded;
c. serial: (a) then (b);
d. pipelined: the forward over the new tokens with a pre-hook on every
   decoder layer that advances ``retrieve_layer`` once, so layer ``l``'s
   attention waits only for layer ``l``'s KV while later layers load.

The model runs on a side CUDA stream, not the default one (``_side_stream``),
and ``_timed`` synchronises the whole device around each measured run.
The model reads the paged cache directly: the slot mapping is the identity,
so layer ``l``'s keys are a ``[1, H, cached, D]`` view of the paged tensor,
seeded into a transformers ``DynamicCache`` before the forward; the forward
then reads the cached KV in stream order behind each layer's step.

Checks: the loaded KV equals the stored KV byte for byte; (d)'s logits equal
(c)'s exactly; and they are within bf16 tolerance (cosine >= 0.999, largest
difference <= 5% of the largest logit) of a full prefill of the whole
prompt. Reported: medians of ``--reps`` runs after a warm-up run, and
TTFT(d) / max(a, b) against the target of 1.15. ``--tiny`` runs a small model
on the CPU with a host slab (for tests: its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

from .. import layerwise as library
from ..config import CacheEngineConfig, CacheEngineMetadata
from ..engine import CacheEngine
from ..errors import StorageFullError
from ..io.driver import fs_type
from ..layerwise import LOOKAHEAD
from ..units import GB, MiB
from . import ttft
from .common import header, print_table, write_json

__all__ = ["TARGET", "TINY", "main", "run"]

#: TTFT of the pipelined run over max(load alone, compute alone) this bench is meant to show.
TARGET = 1.15
#: The ``--tiny`` model (CPU tests).
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=1000)


def _seeded_cache(model, paged: list, n: int):
    """A ``DynamicCache`` whose layers are views of the paged cache's first ``n`` slots (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    for layer, t in enumerate(paged):
        H, D = t.shape[-2], t.shape[-1]
        k, v = (t[j].view(-1, H, D)[:n].permute(1, 0, 2).unsqueeze(0) for j in range(2))
        while len(cache.layers) <= layer:      # versions that add layers on first use
            cache.layers.append(DynamicLayer())
        entry = cache.layers[layer]
        try:
            entry.lazy_initialization(k, v)
        except TypeError:                      # transformers 4.56-4.57: keys only
            entry.lazy_initialization(k)
        entry.keys, entry.values = k, v
    return cache


def _cache_arg(model) -> str:
    """The forward's cache argument: ``cache`` in recent transformers (``past_key_values`` warns there)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


@torch.no_grad()
def _forward(model, new_ids: torch.Tensor, cache, hook=None):
    """The new tokens' forward over ``cache`` and the last position's logits; ``hook(layer)`` runs
    before each decoder layer."""
    handles = []
    if hook is not None:
        for layer, mod in enumerate(model.model.layers):
            handles.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: hook(layer)))
    try:
        out = model.model(input_ids=new_ids, use_cache=True, **{_cache_arg(model): cache})
        return model.lm_head(out["last_hidden_state"][:, -1:]).float()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _prefill_and_store(model, ids: torch.Tensor, eng: CacheEngine, paged: list, slots: torch.Tensor):
    """Prefill ``ids`` with a hook after each decoder layer that copies its KV into ``paged`` and hands
    it to ``store_layer``; the store's result (its disk writes waited for)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n = ids.shape[1]
    steps = eng.store_layer(ids[0].cpu(), paged, slots)

    def after(layer):
        k, v = ttft._layer_kv(cache, layer)
        H, D = k.shape[1], k.shape[3]
        for j, x in enumerate((k, v)):
            paged[layer][j].view(-1, H, D)[:n].copy_(x[0].transpose(0, 1))
        next(steps)

    handles = [mod.register_forward_hook(lambda m, a, o, layer=layer: after(layer))
               for layer, mod in enumerate(model.model.layers)]
    try:
        model.model(input_ids=ids, use_cache=True, **{_cache_arg(model): cache})
    finally:
        for h in handles:
            h.remove()
    result = next(steps)
    for f in result.futures:
        f.result()
    return result


def _side_stream(dev):
    """The model's work (prefill, store, every run) on a stream of its own, as a serving engine runs it:
    KvikIO and the mapped engine's read-ahead synchronise with the CUDA default (legacy) stream, so
    compute queued there would hold their transfers up and the pipelined run would measure that."""
    return torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else contextlib.nullcontext()


def _timed(dev, fn):
    ttft._sync(dev)
    t = time.perf_counter()
    out = fn()
    ttft._sync(dev)
    return time.perf_counter() - t, out


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = logits.flatten(), ref.flatten()
    diff = (a - b).abs().max().item()
    rel = diff / max(b.abs().max().item(), 1e-30)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {"max abs diff": diff, "rel diff": rel, "cosine": cos, "same top-1": int(a.argmax()) == int(b.argmax()),
            "within bf16 tol": cos >= 0.999 and rel <= 0.05}


def _one_format(fmt, model, dev, ids, n_cached, src, slots, work, cfg_kw, md, reps) -> dict:
    """Store the cached part in ``fmt``, then the warm-up run and ``reps`` timed runs of (a)-(d)."""
    cfg = CacheEngineConfig(local_disk=os.path.join(work, fmt), use_layerwise=fmt == "layered", **cfg_kw)
    cached_ids, new_ids = ids[:, :n_cached], ids[:, n_cached:]
    with CacheEngine(cfg, md, "vllm") as eng:
        t_store, res = _timed(dev, lambda: _prefill_and_store(model, cached_ids, eng, src, slots))
    toks = cached_ids[0].cpu()
    dst = [torch.zeros_like(x) for x in src]
    times = {k: [] for k in "abcd"}
    exact, loaded, io_line, stall, first, logits = True, [], "", [], [], {}
    for rep in range(reps + 1):
        for x in dst:
            x.zero_()
        with CacheEngine(cfg, md, "vllm") as eng:                        # (a) load alone
            marks = []

            def load():
                t = time.perf_counter()
                steps = eng.retrieve_layer(toks, dst, slots)
                out = [next(steps), next(steps)]               # the plan, then layer 0 released
                marks.append(time.perf_counter() - t)
                return out + list(steps)
            dt, out = _timed(dev, load)
            loaded.append(out[-1])
            rep_io = eng.storage.io_report()
            io_line = rep_io.line() if rep_io is not None else "no disk tier"
        if not rep:
            exact = all(ttft._same(ttft._rows(d, slots), ttft._rows(s, slots)) for d, s in zip(dst, src))
        if rep:
            times["a"].append(dt)
            first.append(marks[0])
        dt, logits["b"] = _timed(dev, lambda: _forward(model, new_ids, _seeded_cache(model, dst, n_cached)))
        if rep:
            times["b"].append(dt)
        for x in dst:
            x.zero_()
        with CacheEngine(cfg, md, "vllm") as eng:                        # (c) serial
            def serial():
                loaded.append(list(eng.retrieve_layer(toks, dst, slots))[-1])
                return _forward(model, new_ids, _seeded_cache(model, dst, n_cached))
            dt, logits["c"] = _timed(dev, serial)
            if rep:
                times["c"].append(dt)
        for x in dst:
            x.zero_()
        with CacheEngine(cfg, md, "vllm") as eng:                        # (d) pipelined
            waited = [0.0]

            def pipelined():
                steps = eng.retrieve_layer(toks, dst, slots)
                next(steps)

                def hook(layer):
                    t = time.perf_counter()
                    next(steps)
                    waited[0] += time.perf_counter() - t
                out = _forward(model, new_ids, _seeded_cache(model, dst, n_cached), hook)
                loaded.append(next(steps))
                return out
            dt, logits["d"] = _timed(dev, pipelined)
            if rep:
                times["d"].append(dt)
                stall.append(waited[0])
        exact = exact and torch.equal(logits["c"], logits["d"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["d"] / max(med["a"], med["b"])
    return {"format": fmt, "load ms (a)": med["a"] * 1e3, "layer 0 ready ms (a)": statistics.median(first) * 1e3,
            "compute ms (b)": med["b"] * 1e3, "serial ms (c)": med["c"] * 1e3, "pipelined ms (d)": med["d"] * 1e3,
            "d/max(a,b)": ratio, "target": f"<= {TARGET:g}", "met": "yes" if ratio <= TARGET else "NO",
            "d/c": med["d"] / med["c"], "exact": exact and all(x == n_cached for x in loaded),
            "logits d == c": torch.equal(logits["c"], logits["d"]), "io path": io_line, "stored tokens": int(res),
            "store ms (prefill + store_layer)": t_store * 1e3, "hook wait ms (d)": statistics.median(stall) * 1e3,
            "loaded tokens": loaded, **{f"{k} ms all": [x * 1e3 for x in v] for k, v in times.items()},
            "_logits": logits["d"]}


def run(cached: int = 32768, new: int = 2048, layers: int = 32, directory: Optional[str] = None, reps: int = 3,
        chunk: int = 256, block: int = 16, io_engine: str = "auto", formats=("layered", "whole"), device=None,
        shape: Optional[dict] = None, memory_device: str = "auto") -> dict:
    """Measure and verify; returns the JSON payload (``rows``: one per storage format)."""
    dev = torch.device(device or "cuda")
    shape = {**ttft.LLAMA3_8B, **(shape or {})}
    H, D, dtype = shape["num_key_value_heads"], shape["head_dim"], torch.bfloat16
    root = ttft.cache_root(directory)
    problem = ttft.room_problem(root, [cached], layers, shape)  # one format's directory at a time
    if problem:
        raise StorageFullError(problem)
    if root is not None:
        os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gds_kvcache-layerwise-", dir=root)
    total = cached + new
    model = ttft.build_model(layers, total, dev, shape)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, total), generator=gen).to(dev)
    kv_bytes = 2 * layers * cached * H * D * dtype.itemsize
    slab_gb = (kv_bytes * 1.15 + 64 * MiB) / GB
    cfg_kw = dict(chunk_size=chunk, max_local_disk_size=(kv_bytes * 1.3 + 64 * MiB) / GB, max_local_cpu_size=slab_gb,
                  slab_size=slab_gb, io_engine=io_engine, memory_device=memory_device)
    md = CacheEngineMetadata("bench/llama-3-8b-random", 1, 0, "vllm", dtype, (layers, 2, chunk, H, D))
    ttft._sync(dev)              # the model and the ids were made on the default stream
    try:
        with torch.no_grad(), _side_stream(dev):
            full_times, ref = [], None
            for i in range(reps + 1):
                dt, (_, ref) = _timed(dev, functools.partial(ttft.prefill, model, ids))
                if i:
                    full_times.append(dt)
            ref = ref.float()
            num_blocks = -(-cached // block)
            src = [torch.zeros((2, num_blocks, block, H, D), dtype=dtype, device=dev) for _ in range(layers)]
            slots = torch.arange(cached, device=dev)
            rows = []
            for fmt in formats:
                row = _one_format(fmt, model, dev, ids, cached, src, slots, work, cfg_kw, md, reps)
                row.update(_compare(row.pop("_logits"), ref))
                row["full prefill ms"] = statistics.median(full_times) * 1e3
                rows.append(row)
                shutil.rmtree(os.path.join(work, fmt), ignore_errors=True)
            ttft._sync(dev)
    finally:
        del model
        shutil.rmtree(work, ignore_errors=True)
    return {**header(), "directory": work, "filesystem": fs_type(work), "cached tokens": cached, "new tokens": new,
            "lookahead": library.LOOKAHEAD, "compute stream": "side" if dev.type == "cuda" else "host",
            "chunk": chunk, "block": block, "reps": reps, "GB cached": kv_bytes / 1e9,
            "model": {**shape, "num_hidden_layers": layers, "dtype": "bfloat16", "attn": "sdpa"}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_layerwise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached", type=lambda t: ttft.parse_tokens(t)[0], default=32768, help="cached tokens (32k)")
    ap.add_argument("--new", type=lambda t: ttft.parse_tokens(t)[0], default=2048, help="new tokens (2k)")
    ap.add_argument("--layers", type=ttft._positive, default=32)
    ap.add_argument("--reps", type=ttft._positive, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--dir", default=None, help="where the cache directory goes (default /dev/shm if present)")
    ap.add_argument("--chunk", type=ttft._positive, default=256)
    ap.add_argument("--block", type=ttft._positive, default=16)
    ap.add_argument("--io-engine", default="auto", choices=["auto", "kvikio", "posix", "mapped"])
    ap.add_argument("--formats", default="layered,whole", help="storage formats to run: layered, whole or both")
    ap.add_argument("--lookahead", type=int, default=None,
                    help=f"layers read ahead by retrieve_layer (default: the library's, {LOOKAHEAD})")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU with a host slab (a test run)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    if a.lookahead is not None:
        if a.lookahead < 0:
            ap.error(f"--lookahead must be >= 0, got {a.lookahead}")
        library.LOOKAHEAD = a.lookahead
    formats = tuple(f.strip() for f in a.formats.split(",") if f.strip())
    if not formats or any(f not in ("layered", "whole") for f in formats):
        ap.error(f"--formats takes layered, whole or layered,whole; got {a.formats!r}")
    if a.tiny:
        kw = dict(device="cpu", shape=TINY, memory_device="host")
    else:
        why = ttft.missing_requirements()
        if why is not None:
            print(f"{ap.prog}: error: {why}", file=sys.stderr)
            return 2
        kw = {}
    r = run(cached=a.cached, new=a.new, layers=a.layers, directory=a.dir, reps=a.reps, chunk=a.chunk, block=a.block,
            io_engine=a.io_engine, formats=formats, **kw)
    print_table(r["rows"], ["format", "load ms (a)", "layer 0 ready ms (a)", "compute ms (b)", "serial ms (c)",
                            "pipelined ms (d)", "d/max(a,b)", "target", "met", "d/c", "exact", "logits d == c",
                            "within bf16 tol", "io path"],
                f"bench_layerwise on {r['device']}: {r['cached tokens']} cached + {r['new tokens']} new tokens, "
                f"{r['model']['num_hidden_layers']} layers; full prefill {r['rows'][0]['full prefill ms']:.1f} ms; "
                f"cache in {r['directory']} ({r['filesystem']}), a new engine per run")
    write_json(os.path.join(a.out, f"bench_layerwise{'_' + a.tag if a.tag else ''}.json"), r)
    ok = all(x["exact"] and x["logits d == c"] and x["within bf16 tol"] for x in r["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

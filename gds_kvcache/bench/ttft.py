"""``bench-ttft``: time to first token, prefill against retrieving the stored KV after a restart.

A random-weight Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads,
8 KV heads, head size 128, intermediate 14336, vocab 128256, bf16, sdpa
attention) is built from a ``LlamaConfig`` on the GPU: nothing is
downloaded. For each prompt length:

1. prefill: a forward over the prompt with ``use_cache=True`` plus the first
   token's logits, synchronised; median of ``--reps`` after a warm-up;
2. the KV of the returned cache goes into a vLLM-layout paged cache
   (``[2, num_blocks, block, H, D]`` per layer, shuffled block table) and
   ``CacheEngine.store`` writes it to ``--dir``; the engine is closed;
3. a restart: a new ``CacheEngine`` on the same directory, and ``retrieve``
   into a fresh paged cache with another shuffled block table, synchronised;
   median of ``--reps`` restarts after a warm-up one. On tmpfs nothing is
   dropped (its pages are the data); elsewhere the page cache of the
   directory's files is dropped before each restart;
4. the retrieved KV is compared byte for byte with the model's KV.

GB here is 1e9 bytes. Needs a CUDA GPU and ``transformers``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

from ..config import CacheEngineConfig, CacheEngineMetadata
from ..engine import CacheEngine
from ..errors import StorageFullError
from ..io.page_cache import drop_page_cache
from ..units import GB, MiB
from .common import header, print_table, write_json
from ..io.driver import fs_type

__all__ = ["LLAMA3_8B", "build_model", "cache_root", "main", "missing_requirements", "parse_tokens", "room_problem",
           "run"]

#: ``LlamaConfig`` fields of Llama-3-8B (weights random, so only the shapes matter).
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                 tie_word_embeddings=False)

#: Speedup of retrieve over prefill this bench is meant to show on /dev/shm, by prompt length.
TARGETS = {8192: 8.0, 32768: 12.0}


def parse_tokens(text: str) -> list[int]:
    """``"8192,32768"`` or ``"8k,32k"`` -> ``[8192, 32768]``; argparse's error on anything else."""
    out = []
    for part in str(text).split(","):
        p = part.strip().lower()
        mult = 1024 if p.endswith("k") else 1
        try:
            n = int(p[:-1] if mult > 1 else p) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"--tokens takes comma-separated positive integers (8192 or 8k), "
                                             f"got {part!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"--tokens values must be >= 1, got {part!r}")
        out.append(n)
    return out


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def missing_requirements() -> Optional[str]:
    """One line saying what this bench lacks here (a GPU, ``transformers``), or None."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        missing.append("the 'transformers' package (pip install transformers)")
    if not missing:
        return None
    return "bench-ttft needs " + " and ".join(missing)


def cache_root(directory: Optional[str]) -> Optional[str]:
    """Where the bench's temp cache directory goes: ``directory``, else /dev/shm if present, else the temp dir."""
    return directory or ("/dev/shm" if os.path.isdir("/dev/shm") else None)


def room_problem(root: Optional[str], tokens, layers: int, shape: Optional[dict] = None) -> Optional[str]:
    """One line if ``root``'s file system cannot hold the longest prompt's cache, else None.

    Only one length's cache exists at a time; its pool is sized 1.3x the KV.
    """
    shape = {**LLAMA3_8B, **(shape or {})}
    need = 2 * layers * max(tokens) * shape["num_key_value_heads"] * shape["head_dim"] * 2 * 1.3 + 64 * MiB
    path = os.path.abspath(root or tempfile.gettempdir())
    while not os.path.exists(path):  # a --dir not made yet: its file system is its parent's
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if free >= need:
        return None
    return (f"{path} ({fs_type(path)}) has {free / 1e9:.1f} GB free; {max(tokens)} tokens of {layers} layers "
            f"need {need / 1e9:.1f} GB: pass --dir on a larger file system")


def build_model(layers: int, max_tokens: int, device, shape: Optional[dict] = None):
    """A random-weight bf16 Llama (``LLAMA3_8B`` shapes unless ``shape`` overrides) on ``device``, eval mode.

    Built straight on the device in bf16: a float32 CPU build of 8B parameters
    would take 32 GB of host memory and minutes of initialisation.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**LLAMA3_8B, **(shape or {}), "num_hidden_layers": layers}
    cfg = LlamaConfig(max_position_embeddings=max(max_tokens, 8192), attn_implementation="sdpa", **fields)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _output_cache(out):
    # transformers 5 names it ``cache`` (reading ``past_key_values`` warns); 4.x ``past_key_values``.
    keys = out.keys()
    return out["cache"] if "cache" in keys else out["past_key_values"]


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s ``(keys, values)``, each ``[batch, kv_heads, tokens, head_size]``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        entry = cache.layers[layer]
        return entry.keys, entry.values
    if hasattr(cache, "key_cache"):  # DynamicCache before 4.56
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]  # legacy tuple of tuples


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """The forward that makes the first token: the whole prompt with a KV cache, then the
    last position's logits only (logits for every position would add 32k x 128k values
    a server never computes)."""
    out = model.model(input_ids=ids, use_cache=True)
    logits = model.lm_head(out["last_hidden_state"][:, -1:])
    return _output_cache(out), logits


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _slots(tokens: int, block: int, num_blocks: int, gen: torch.Generator, dev) -> torch.Tensor:
    """A shuffled block table's slot mapping, as a serving engine hands it over."""
    blocks = torch.randperm(num_blocks, generator=gen)[: -(-tokens // block)]
    return (blocks[:, None] * block + torch.arange(block)).reshape(-1)[:tokens].to(dev)


def _rows(layer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[2, tokens, H*D]`` rows of a vLLM-layout layer at ``slots``."""
    return layer.view(2, -1, layer.shape[-2] * layer.shape[-1])[:, slots]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def _prefill_timed(model, ids: torch.Tensor, reps: int, dev: torch.device):
    """The last run's cache and the seconds of ``reps`` prefills after a warm-up one."""
    cache, times = None, []
    for i in range(reps + 1):
        cache = None  # free the previous run's KV first
        _sync(dev)
        t = time.perf_counter()
        cache, _ = prefill(model, ids)
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t)
    return cache, times


def _to_paged(cache, layers: int, n: int, block: int, gen: torch.Generator, dev):
    """The model's KV in a vLLM paged cache (twice the blocks needed, shuffled block table):
    ``(per-layer caches, slot mapping, whether its rows equal the model's KV)``."""
    k0, _ = _layer_kv(cache, 0)
    H, D, dtype = k0.shape[1], k0.shape[3], k0.dtype
    num_blocks = -(-n // block) * 2
    src = [torch.empty((2, num_blocks, block, H, D), dtype=dtype, device=dev) for _ in range(layers)]
    slots = _slots(n, block, num_blocks, gen, dev)
    ok = True
    for layer in range(layers):
        k, v = _layer_kv(cache, layer)
        assert k.shape == (1, H, n, D), (k.shape, (1, H, n, D))
        rows = torch.stack((k[0].transpose(0, 1), v[0].transpose(0, 1)))  # [2, n, H, D]
        for j in range(2):
            src[layer][j].view(-1, H, D).index_copy_(0, slots, rows[j])
        ok &= _same(_rows(src[layer], slots), rows.reshape(2, n, H * D))
    return src, slots, ok


def _restart_retrieve(cfg, md, ids, dst, slots, dev, directory: str, cold: bool) -> tuple[float, int, str]:
    """Open a new engine on ``directory`` (a restart), retrieve into ``dst``; (seconds, tokens, io path)."""
    if cold:
        drop_page_cache(os.path.join(directory, f) for f in os.listdir(directory)
                        if os.path.isfile(os.path.join(directory, f)))
    with CacheEngine(cfg, md, "vllm") as eng:
        _sync(dev)
        t = time.perf_counter()
        n = eng.retrieve(ids, dst, slots)
        _sync(dev)
        dt = time.perf_counter() - t
        rep = eng.storage.io_report()
        line = rep.line() if rep is not None else "no disk tier"
    return dt, n, line


def run(tokens=(8192, 32768), layers: int = 32, directory: Optional[str] = None, reps: int = 3,
        chunk: int = 256, block: int = 16, io_engine: str = "auto", device=None,
        shape: Optional[dict] = None, memory_device: str = "auto") -> dict:
    """Measure and verify; returns the JSON payload (``rows``: one per prompt length).

    Parameters
    ----------
    tokens, layers, directory, reps, chunk, block, io_engine
        As the command-line flags of the same names.
    device, shape, memory_device
        Let tests run a tiny model on the CPU with a host slab.

    Notes
    -----
    The full model at 32k tokens takes about 45 GB of GPU memory (16 GB of
    weights, the model's 4 GiB KV, source and destination paged caches of
    twice the blocks needed, a slab of 1.15x the KV) and the cache directory
    about 1.3x the KV (5.6 GB). ``--layers 4`` gives a run of seconds with the
    same per-layer shapes, but the prefill/retrieve ratio of a full model
    only with all 32 layers.
    """
    dev = torch.device(device or "cuda")
    shape = {**LLAMA3_8B, **(shape or {})}
    H, D = shape["num_key_value_heads"], shape["head_dim"]
    dtype = torch.bfloat16
    root = cache_root(directory)
    problem = room_problem(root, tokens, layers, shape)  # now, not after minutes of model building
    if problem:
        raise StorageFullError(problem)
    if root is not None:
        os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gds_kvcache-ttft-", dir=root)
    fs = fs_type(work)
    cold = fs != "tmpfs"
    model = build_model(layers, max(tokens), dev, shape)
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for n in tokens:
            kv_bytes = 2 * layers * n * H * D * dtype.itemsize
            ids = torch.randint(0, shape["vocab_size"], (1, n), generator=gen).to(dev)
            cache, times = _prefill_timed(model, ids, reps, dev)
            t_prefill = statistics.median(times)
            src, slots, model_ok = _to_paged(cache, layers, n, block, gen, dev)
            del cache
            num_blocks = src[0].shape[1]

            sub = os.path.join(work, f"t{n}")
            slab_gb = (kv_bytes * 1.15 + 64 * MiB) / GB
            cfg = CacheEngineConfig(chunk_size=chunk, local_disk=sub, max_local_disk_size=(kv_bytes * 1.3 + 64 * MiB)
                                    / GB, max_local_cpu_size=slab_gb, slab_size=slab_gb, io_engine=io_engine,
                                    memory_device=memory_device)
            md = CacheEngineMetadata("bench/llama-3-8b-random", 1, 0, "vllm", dtype, (layers, 2, chunk, H, D))
            ids_host = ids[0].cpu()
            with CacheEngine(cfg, md, "vllm") as eng:
                _sync(dev)
                t = time.perf_counter()
                r = eng.store(ids_host, src, slots)
                for f in r.futures:
                    f.result()
                t_store = time.perf_counter() - t
                stored = int(r)

            # Restarts: a fresh engine each time, retrieving into a fresh block table.
            dst = [torch.zeros_like(x) for x in src]
            slots2 = _slots(n, block, num_blocks, gen, dev)
            t_ret, loaded, io_line = [], 0, ""
            for i in range(reps + 1):
                for x in dst:
                    x.zero_()
                dt, loaded, io_line = _restart_retrieve(cfg, md, ids_host, dst, slots2, dev, sub, cold)
                if i:
                    t_ret.append(dt)
            exact = model_ok and loaded == n and all(_same(_rows(d, slots2), _rows(s, slots))
                                                     for d, s in zip(dst, src))
            # The same engine again: chunks now in its hot tier, no disk read.
            with CacheEngine(cfg, md, "vllm") as eng:
                eng.retrieve(ids_host, dst, slots2)
                _sync(dev)
                t = time.perf_counter()
                eng.retrieve(ids_host, dst, slots2)
                _sync(dev)
                t_hot = time.perf_counter() - t
            del src, dst
            shutil.rmtree(sub, ignore_errors=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()

            t_retrieve = statistics.median(t_ret)
            speedup = t_prefill / t_retrieve
            target = TARGETS.get(n)
            rows.append({"tokens": n, "prefill ms": t_prefill * 1e3, "retrieve ms": t_retrieve * 1e3,
                         "speedup": speedup, "GB moved": kv_bytes / 1e9, "GB/s": kv_bytes / t_retrieve / 1e9,
                         "target": f">= {target:g}x" if target else "-",
                         "met": ("yes" if speedup >= target else "NO") if target else "-",
                         "exact": exact, "io path": io_line, "stored tokens": stored, "loaded tokens": loaded,
                         "store ms": t_store * 1e3, "hot retrieve ms": t_hot * 1e3,
                         "prefill ms all": [x * 1e3 for x in times], "retrieve ms all": [x * 1e3 for x in t_ret]})
    finally:
        del model
        shutil.rmtree(work, ignore_errors=True)
    model_shape = {**shape, "num_hidden_layers": layers, "dtype": "bfloat16", "attn": "sdpa"}
    return {**header(), "directory": work, "filesystem": fs, "page cache dropped": cold, "chunk": chunk,
            "block": block, "reps": reps, "model": model_shape, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gds-kvcache bench-ttft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=parse_tokens, default=[8192, 32768], help="prompt lengths (default 8192,32768)")
    ap.add_argument("--layers", type=_positive, default=32, help="decoder layers (default 32; fewer for a quick run)")
    ap.add_argument("--dir", default=None, help="where the cache directory goes (default: a temp dir under "
                    "/dev/shm if present)")
    ap.add_argument("--reps", type=_positive, default=3, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--chunk", type=_positive, default=256, help="tokens per stored chunk (default 256)")
    ap.add_argument("--block", type=_positive, default=16, help="paged-cache block size (default 16)")
    ap.add_argument("--io-engine", default="auto", choices=["auto", "kvikio", "posix", "mapped"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    # What the machine lacks is said in one line before any work (exit 2, as for a bad flag);
    # failures while running propagate (the gds-kvcache command reports them, exit 1).
    why = missing_requirements() or room_problem(cache_root(a.dir), a.tokens, a.layers)
    if why is not None:
        print(f"{ap.prog}: error: {why}", file=sys.stderr)
        return 2
    r = run(tokens=a.tokens, layers=a.layers, directory=a.dir, reps=a.reps, chunk=a.chunk, block=a.block,
            io_engine=a.io_engine)
    print_table(r["rows"], ["tokens", "prefill ms", "retrieve ms", "speedup", "GB moved", "GB/s", "target", "met",
                            "exact", "io path"],
                f"bench-ttft on {r['device']}: Llama-3-8B shape, {a.layers} layers, random weights; cache in "
                f"{r['directory']} ({r['filesystem']}{', page cache dropped' if r['page cache dropped'] else ''})")
    write_json(os.path.join(a.out, f"bench_ttft{'_' + a.tag if a.tag else ''}.json"), r)
    return 0 if all(x["exact"] for x in r["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

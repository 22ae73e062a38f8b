"""End to end on vLLM (CPU build): the plug-in gives identical greedy outputs, hits, persistence, recomputes
corrupt chunks, and runs in an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) too.

Each vLLM run is a child process running this file (vLLM spawns processes, hence the
``__main__`` guard). Needs vLLM and transformers (``scripts/ci-vllm.sh``); skipped without them.
The timings and hit rate are written to ``$GDS_KVCACHE_E2E_JSON`` when set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

N_PROMPTS, PROMPT_LEN, GEN = 8, 1536, 8
BLOCK = 32
#: The engines' dtype (test_vllm_fleet_e2e.py's instances use it too: they compare with this baseline).
DTYPE = "bfloat16"


def _extra(root: str) -> dict:
    return {"spec_name": "GdsKvCacheSpec", "spec_module_path": "gds_kvcache.integrations.vllm",
            "local_disk": root, "max_local_disk_size": 2, "io_engine": "posix", "io_threads": 2,
            "slab_size": 0.25, "pool_files": 2}


def child(mode: str, model: str, root: str, out: str) -> None:
    """One vLLM engine: generate the prompts (twice with the plug-in, a prefix-cache reset between)."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(7)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 500) for _ in range(PROMPT_LEN)])
               for _ in range(N_PROMPTS)]
    kw = dict(model=model, skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=2048,
              enforce_eager=True, dtype=DTYPE, block_size=BLOCK, seed=0, max_num_seqs=8)
    if mode != "baseline":
        kw["kv_transfer_config"] = {"kv_connector": "GdsKvCacheConnector",
                                    "kv_connector_module_path": "gds_kvcache.integrations.vllm",
                                    "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                    "kv_connector_extra_config": _extra(root)}
    llm = LLM(**kw)
    # Top-2 logprobs: where the best two tokens are nearly tied, batching differences alone may flip
    # the greedy choice (random weights make near-ties common), and the test must tell that apart.
    sp = SamplingParams(temperature=0.0, max_tokens=GEN, logprobs=2)
    # Warm-up on an unrelated prompt: the first step pays one-time kernel set-up, not KV work.
    llm.generate([TokensPrompt(prompt_token_ids=[1] * 64)], sp, use_tqdm=False)
    passes = []
    # Baseline: the second pass (prefix cache reset) is the recompute the plug-in saves.
    for i in range(2 if mode in ("plugin", "baseline", "inproc") else 1):
        if i:
            llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        passes.append({"seconds": dt,
                       "tokens": [list(o.outputs[0].token_ids) for o in outs],
                       "logprobs": [[float(next(iter(lp.values())).logprob) if lp else None
                                     for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "margins": [[_margin(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "runner_up": [[_runner_up(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "cached": [o.num_cached_tokens or 0 for o in outs]})
        time.sleep(1.0)  # the stores of this pass finish in the background
    del llm
    with open(out, "w") as f:
        json.dump({"passes": passes}, f)


def _margin(lp):
    """Logprob gap between the best and the second-best token at one position (None if unknown)."""
    if not lp:
        return None
    top = sorted((float(v.logprob) for v in lp.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else None


def _runner_up(lp):
    """The second-best token at one position (None if unknown)."""
    if not lp or len(lp) < 2:
        return None
    return sorted(lp.items(), key=lambda kv: float(kv[1].logprob), reverse=True)[1][0]


#: A greedy choice this close to the runner-up (in logprob) may flip when only the batching differs:
#: this model's logits lie in [8, 16), where one bf16 step is 0.0625, so two steps are 0.125 (a fresh-
#: clone CI run saw a storing pass, which loads nothing, part ways at a gap of 0.125). The random-
#: weight model below has exact bf16 ties in most prompts. (float32 would remove the ties, but the
#: fleet tests' API servers and instances share this baseline and run the model in bf16.)
NEAR_TIE = 0.13


def _same_output(got: dict, base: dict, what: str) -> None:
    """``got``'s tokens equal ``base``'s, except that a prompt may part ways where the baseline's
    best two tokens were nearly tied and ``got`` took the runner-up; up to there the logprobs of
    the tokens chosen agree within 0.1. Wrong KV would change them by far more, well before a tie."""
    for i, (g, w) in enumerate(zip(got["tokens"], base["tokens"])):
        j = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if j is None:
            assert len(g) == len(w), f"{what}: prompt {i} has {len(g)} tokens, not {len(w)}"
        else:
            m, second = base["margins"][i][j], base["runner_up"][i][j]
            assert m is not None and m <= NEAR_TIE and g[j] == second, (
                f"{what}: prompt {i} differs at token {j} ({g[j]} for {w[j]}) where the baseline's margin "
                f"was {m} (near-tie: <= {NEAR_TIE}) and its runner-up {second}")
        upto = len(w) if j is None else j
        for k in range(upto):
            x, y = base["logprobs"][i][k], got["logprobs"][i][k]
            assert x is None or y is None or abs(x - y) <= 0.1, f"{what}: prompt {i} token {k}: logprob {y} vs {x}"


def _run(mode, model, root, tmp):
    out = os.path.join(tmp, f"{mode}.json")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    if mode == "inproc":
        # The engine core and its worker in this one process: vLLM-CPU then scans every loaded
        # module at worker start, which failed while importing the plug-in loaded Numba.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, mode, model, root, out], env=env, capture_output=True, text=True,
                       timeout=900)
    if p.returncode:
        raise AssertionError(f"{mode} run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(out) as f:
        res = json.load(f)
    res["wall"] = time.perf_counter() - t0
    res["log"] = p.stderr + p.stdout
    return res


def _model(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Big enough that prefill costs more than reading its KV back (GQA: 2 KB of KV per token).
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.15, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def _stats(root):
    with open(os.path.join(root, "vllm-stats.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # five engine processes, one after another
def test_vllm_cpu_end_to_end(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("vllm")
        pytest.importorskip("transformers")
    from gds_kvcache.storage.index_log import IndexLog
    from gds_kvcache.storage.pool_file import LAYOUT_NAME, POOL_NAME, pieces

    model = _model(str(tmp_path / "model"))
    root = str(tmp_path / "kv")
    tmp = str(tmp_path)
    report = {}

    base = _run("baseline", model, root, tmp)
    ref = base["passes"][0]
    want = ref["tokens"]
    # The baseline against itself holds to the same rule as the plug-in runs below: vLLM-CPU may
    # batch the two passes differently, and a random-weight model has exact bf16 ties (seen in CI:
    # a second baseline pass took the runner-up at token 1 of one prompt).
    _same_output(base["passes"][1], ref, "baseline, second pass")
    assert len({tuple(t) for t in want}) > 1, "random weights must give different outputs per prompt"

    plug = _run("plugin", model, root, tmp)
    first, second = plug["passes"]
    _same_output(first, ref, "plug-in, storing pass")
    _same_output(second, ref, "plug-in, loading pass")
    report["exact_prompts"] = [sum(g == w for g, w in zip(p["tokens"], want)) for p in (first, second)]
    st = _stats(root)
    loaded_tokens = st["chunks_loaded"] * BLOCK
    prompt_tokens = N_PROMPTS * PROMPT_LEN
    hit = loaded_tokens / prompt_tokens
    report.update(recompute_pass_s=base["passes"][1]["seconds"], first_pass_s=first["seconds"],
                  second_pass_s=second["seconds"], hit_rate=hit,
                  vllm_cached_tokens=sum(second["cached"]), plugin_wall_s=plug["wall"], stats=st)
    assert hit >= 0.95, (st, second["cached"])
    assert sum(second["cached"]) >= 0.95 * prompt_tokens

    again = _run("restart", model, root, tmp)
    _same_output(again["passes"][0], ref, "restarted engine")
    st2 = _stats(root)
    assert st2["chunks_loaded"] * BLOCK >= 0.95 * prompt_tokens  # counters restart with the process
    report.update(restart_pass_s=again["passes"][0]["seconds"], restart_stats=st2)

    # Flip one byte of one stored chunk: its blocks are recomputed, the output stays the same.
    shard = os.path.join(root, "rank0")
    with open(os.path.join(shard, LAYOUT_NAME)) as fh:
        lay = json.load(fh)
    log = IndexLog(shard)
    entries, _ = log.load()
    log.close()
    victim = sorted(entries, key=lambda e: e.offset)[len(entries) // 2]
    f, local, _, _ = pieces(victim.offset, 1, lay["stripes"], lay["unit"])[0]
    with open(os.path.join(shard, f"{POOL_NAME}.{f}"), "r+b") as fh:
        fh.seek(local + 5)
        b = fh.read(1)
        fh.seek(local + 5)
        fh.write(bytes([b[0] ^ 0x5A]))
    bad = _run("corrupt", model, root, tmp)
    _same_output(bad["passes"][0], ref, "corrupt chunk recomputed")
    st3 = _stats(root)
    assert st3["load_failures"] >= 1
    report.update(corrupt_stats=st3, baseline_pass_s=base["passes"][0]["seconds"])

    # In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) on a new directory: stores, then loads.
    root2 = str(tmp_path / "kv-inproc")
    inproc = _run("inproc", model, root2, tmp)
    _same_output(inproc["passes"][0], ref, "in-process engine, storing pass")
    _same_output(inproc["passes"][1], ref, "in-process engine, loading pass")
    st4 = _stats(root2)
    assert st4["chunks_loaded"] * BLOCK >= 0.95 * prompt_tokens, st4
    report.update(inproc_stats=st4, inproc_second_pass_s=inproc["passes"][1]["seconds"])
    dest = os.environ.get("GDS_KVCACHE_E2E_JSON")
    if dest:
        with open(dest, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    child(*sys.argv[1:5])

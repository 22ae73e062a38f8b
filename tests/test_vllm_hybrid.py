"""Hybrid models on vLLM (CPU build) with the plug-in: several KV cache groups, stored and loaded per group.

Two random-weight models with vLLM's hybrid KV cache manager on (the connector keeps it on):

* ``Gemma3ForCausalLM``: sliding-window (256 tokens) and full-attention layers, two KV cache groups;
* ``Qwen3NextForCausalLM``: linear-attention (Mamba-style state) and full-attention layers.

Each runs a baseline without the plug-in, then with it a storing pass and, after
``reset_prefix_cache()``, a loading pass; both passes must match the baseline under
``test_vllm_e2e``'s near-tie rule, and the loads are counted per group (``vllm-stats.json``).
Gemma-3 runs in fleet mode too: instance A stores, instance B (another process, another writer
id, the same directory and Redis) loads A's chunks per group in its first pass.
Each vLLM run is a child process running this file. Needs vLLM and transformers
(``scripts/ci-vllm.sh``); skipped without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

N_PROMPTS, PROMPT_LEN, GEN, BLOCK = 3, 1500, 8, 32
HERE = os.path.dirname(os.path.abspath(__file__))


def _extra(root: str) -> dict:
    return {"spec_name": "GdsKvCacheSpec", "spec_module_path": "gds_kvcache.integrations.vllm",
            "local_disk": root, "max_local_disk_size": 2, "io_engine": "posix", "io_threads": 2,
            "slab_size": 0.25, "pool_files": 2}


def child(mode: str, model: str, root: str, out: str, vocab: str) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, HERE)
    from test_vllm_e2e import _margin, _runner_up

    rng = random.Random(11)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, int(vocab)) for _ in range(PROMPT_LEN)])
               for _ in range(N_PROMPTS)]
    kw = dict(model=model, skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=2048,
              enforce_eager=True, dtype="bfloat16", block_size=BLOCK, seed=0, max_num_seqs=4)
    extra = _extra(root)
    stats = os.path.join(root, "vllm-stats.json")
    if mode.startswith("fleet-"):      # fleet mode: writer id after the dash, Redis from the test
        wid = mode[len("fleet-"):]
        extra.update(lookup_url=os.environ["GDS_KVCACHE_TEST_REDIS_URL"], writer_id=wid, redis_socket_timeout=10)
        stats = os.path.join(root, f"vllm-stats.{wid}.json")
    if mode != "baseline":
        kw["kv_transfer_config"] = {"kv_connector": "GdsKvCacheConnector",
                                    "kv_connector_module_path": "gds_kvcache.integrations.vllm",
                                    "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                    "kv_connector_extra_config": extra}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=GEN, logprobs=2)
    passes = []
    for i in range(2 if mode == "plugin" else 1):
        if i:
            llm.reset_prefix_cache()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        passes.append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                       "logprobs": [[float(next(iter(lp.values())).logprob) if lp else None
                                     for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "margins": [[_margin(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "runner_up": [[_runner_up(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
                       "cached": [o.num_cached_tokens or 0 for o in outs]})
        if mode != "baseline":
            time.sleep(1.0)  # the stores of this pass finish in the background
            llm.generate([TokensPrompt(prompt_token_ids=[5] * 8)], SamplingParams(max_tokens=1), use_tqdm=False)
            with open(stats) as f:
                passes[-1]["stats"] = json.load(f)
    del llm
    with open(out, "w") as f:
        json.dump({"passes": passes}, f)


def _run(mode, model, root, tmp, vocab, redis_url=""):
    out = os.path.join(tmp, f"{os.path.basename(model)}-{mode}.json")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               GDS_KVCACHE_TEST_REDIS_URL=redis_url)
    p = subprocess.run([sys.executable, __file__, mode, model, root, out, str(vocab)], env=env, capture_output=True,
                       text=True, timeout=900)
    if p.returncode:
        raise AssertionError(f"{mode} run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(out) as f:
        res = json.load(f)
    res["log"] = p.stderr + p.stdout
    return res


def gemma3(path: str) -> str:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                           sliding_window=256, layer_types=["sliding_attention", "full_attention"] * 2,
                           max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def qwen3_next(path: str) -> str:
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                          linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                          shared_expert_intermediate_size=128, layer_types=["linear_attention", "full_attention"] * 2,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Qwen3NextForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def _need_vllm():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("vllm")
        pytest.importorskip("transformers")


def _check(tmp_path, make, vocab):
    sys.path.insert(0, HERE)
    from test_vllm_e2e import _same_output

    model = make(str(tmp_path / make.__name__))
    root = str(tmp_path / "kv")
    base = _run("baseline", model, root, str(tmp_path), vocab)["passes"][0]
    plug = _run("plugin", model, root, str(tmp_path), vocab)
    first, second = plug["passes"]
    _same_output(first, base, f"{make.__name__} with the plug-in, storing pass")
    _same_output(second, base, f"{make.__name__} with the plug-in, loading pass")
    stored, loaded = first["stats"], second["stats"]
    return plug, stored, loaded, N_PROMPTS * PROMPT_LEN


@pytest.mark.slow
def test_gemma3_sliding_window_and_full_attention_groups(tmp_path):
    _need_vllm()
    plug, stored, loaded, prompt_tokens = _check(tmp_path, gemma3, 32000)
    assert "supports models with one KV cache group" not in plug["log"]
    groups = loaded["groups"]
    assert sorted(groups) == ["0", "1"], groups
    per = {g: groups[g]["chunks_loaded"] - stored["groups"].get(g, {}).get("chunks_loaded", 0) for g in groups}
    # Group 0 holds the sliding-window layers (they come first), group 1 the full-attention ones. The
    # full-attention group loads the whole prompt (less the last, partial block); the sliding-window group
    # only the blocks inside its 256-token window (vLLM leaves the others out of the specs as null blocks).
    assert per["1"] * BLOCK >= 0.9 * prompt_tokens, (per, groups)
    assert 0 < per["0"] * BLOCK <= N_PROMPTS * (256 + BLOCK), (per, groups)
    assert loaded["load_failures"] == 0
    assert sum(plug["passes"][1]["cached"]) >= 0.9 * prompt_tokens


@pytest.mark.slow
def test_qwen3_next_linear_attention_and_full_attention(tmp_path):
    _need_vllm()
    plug, stored, loaded, prompt_tokens = _check(tmp_path, qwen3_next, 4096)
    assert "supports models with one KV cache group" not in plug["log"]
    groups = loaded["groups"]
    assert sorted(groups) == ["0", "1"], groups
    assert loaded["load_failures"] == 0
    per = {g: groups[g]["chunks_loaded"] - stored["groups"].get(g, {}).get("chunks_loaded", 0) for g in groups}
    # The linear-attention group (its layers come first: group 0) holds one state per block boundary: a
    # load restores the state at the hit, one chunk per prompt. The full-attention group loads the prompt's KV.
    assert per["0"] == N_PROMPTS, (per, groups)
    assert per["1"] > 0 and groups["1"]["hit_tokens"] >= 0.9 * prompt_tokens, (per, groups)
    assert sum(plug["passes"][1]["cached"]) >= 0.9 * prompt_tokens


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gemma3_fleet_instance_loads_another_instances_groups(tmp_path):
    _need_vllm()
    pytest.importorskip("redis")
    from gds_kvcache.shared import LocalRedis, find_redis_server
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (install Debian's redis-server or set GDS_KVCACHE_REDIS_SERVER)")
    sys.path.insert(0, HERE)
    from test_vllm_e2e import _same_output

    model = gemma3(str(tmp_path / "gemma3"))
    root = str(tmp_path / "kv")
    prompt_tokens = N_PROMPTS * PROMPT_LEN
    base = _run("baseline", model, root, str(tmp_path), 32000)["passes"][0]
    with LocalRedis() as srv:
        a = _run("fleet-a", model, root, str(tmp_path), 32000, srv.url)["passes"][0]
        b_run = _run("fleet-b", model, root, str(tmp_path), 32000, srv.url)
    b = b_run["passes"][0]
    _same_output(a, base, "Gemma-3 fleet instance A (storing)")
    _same_output(b, base, "Gemma-3 fleet instance B (loading A's chunks)")
    assert "supports models with one KV cache group" not in b_run["log"]
    st, groups = b["stats"], b["stats"]["groups"]
    assert sorted(groups) == ["0", "1"], groups
    # Every chunk B loaded is A's (B stored nothing before its pass), per group as in the local test.
    assert st["load_failures"] == 0 and st["remote_load_failures"] == 0, st
    assert groups["1"]["chunks_loaded"] * BLOCK >= 0.9 * prompt_tokens, (st, a["stats"])
    assert 0 < groups["0"]["chunks_loaded"] * BLOCK <= N_PROMPTS * (256 + BLOCK), groups
    assert st["remote_chunks_loaded"] == groups["0"]["chunks_loaded"] + groups["1"]["chunks_loaded"], st
    assert sum(b["cached"]) >= 0.9 * prompt_tokens


if __name__ == "__main__":
    child(*sys.argv[1:6])

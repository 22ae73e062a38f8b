"""``LocalRedis``: a throw-away ``redis-server`` on a loopback port (tests, benchmarks, demos)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

__all__ = ["LocalRedis", "find_redis_server"]


def find_redis_server() -> Optional[str]:
    """Path of ``redis-server``: ``$GDS_KVCACHE_REDIS_SERVER``, then ``PATH``, then ``/usr/bin``."""
    for cand in (os.environ.get("GDS_KVCACHE_REDIS_SERVER"), shutil.which("redis-server"),
                 "/usr/bin/redis-server"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A ``redis-server`` without persistence on 127.0.0.1, started and stopped by this object.

    Notes
    -----
    ``restart()`` stops the server and starts an empty one on the same port,
    which is what a crashed Redis without persistence looks like to clients.
    Always ``stop()`` it (or use it as a context manager).
    """

    def __init__(self, port: Optional[int] = None, binary: Optional[str] = None):
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (install Debian's redis-server package or set "
                                    "GDS_KVCACHE_REDIS_SERVER)")
        self.port = port or _free_port()
        self._dir = tempfile.mkdtemp(prefix="gds-kvcache-redis.")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir, "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Kill the server and start an empty one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Shared mode against Redis content and peers that are not what the code expects (issue 17, 1-6):
every bad value is a miss of its own or is repaired, never an exception or a refusal to open."""

import socket
import threading
import time

import pytest
import torch

from gds_kvcache import CacheEngineConfig, SlabMemoryAllocator, StorageManager
from gds_kvcache.errors import ClosedError
from gds_kvcache.units import GB, MiB

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from tests.test_shared_backend import check, key, make_cfg, ns, open_backend, put, server  # noqa: E402,F401


class OkServer:
    """A TCP server that answers ``+OK`` to every line (not a Redis)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(c,), daemon=True).start()

    @staticmethod
    def _answer(c):
        c.settimeout(5)
        try:
            while c.recv(65536):
                c.sendall(b"+OK\r\n")
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self._stop = True
        self.sock.close()


def test_a_peer_answering_ok_to_everything_is_an_unreachable_redis(tmp_path):
    srv = OkServer()
    try:
        cfg = CacheEngineConfig(local_disk=str(tmp_path), max_local_disk_size=16 * MiB / GB, io_engine="posix",
                                io_threads=2, lookup_server_url=srv.url, slab_size=0.008, local_cpu=False,
                                redis_socket_timeout=1.0)
        with StorageManager(cfg) as sm:          # opens, as with a closed port: no AttributeError
            o = sm.allocate((1024,), torch.float32)
            o.tensor.fill_(1.0)
            sm.put(key(1), o)
            assert sm.batched_contains([key(1)]) == 0      # lookups miss while Redis is unusable
            assert sm.disk.stats["redis_errors"] > 0
    finally:
        srv.close()


@pytest.mark.parametrize("field,value", [("stripes", "abc"), ("stripes", "0"), ("unit", "0"), ("dir", None),
                                         ("stripe_bytes", "-4096"), ("dir", "../../elsewhere")])
def test_a_garbled_writer_layout_is_a_miss_and_counted(tmp_path, server, ns, field, value):
    w, walloc = open_backend(tmp_path, server, ns, "w0")
    r, ralloc = open_backend(tmp_path, server, ns, "r0")
    try:
        keys = [key(i) for i in range(4)]
        put(w, walloc, keys)
        lay = f"{ns}:w:w0"
        cli = redis.Redis.from_url(server.url, decode_responses=True)
        w.stop_housekeeping()        # no re-publish repairing the layout under the test
        if value is None:
            cli.hdel(lay, field)
        else:
            cli.hset(lay, field, value)
        assert check(r.batched_get_blocking(keys), keys) == [None] * 4
        assert r.stats["remote_hits"] == 0 and r.stats["remote_misses"] == 4
        cli.close()
    finally:
        r.close()
        w.close()


@pytest.mark.parametrize("control", ["rebuild", "writers", "k:w0", "epoch"])
def test_garbage_under_a_control_key_never_stops_a_process_from_opening(tmp_path, server, ns, control):
    cli = redis.Redis.from_url(server.url, decode_responses=True)
    k = f"{ns}:{control}"
    if control == "rebuild":
        cli.set(k, "not-a-number")
    else:
        cli.delete(k)
        cli.lpush(k, "garbage")          # a list where a set, a string or a counter belongs
    w, walloc = open_backend(tmp_path, server, ns, "w0")
    r, ralloc = open_backend(tmp_path, server, ns, "r0")
    try:
        keys = [key(i) for i in range(3)]
        put(w, walloc, keys)
        assert r.batched_contains(keys) == 3
        assert check(r.batched_get_blocking(keys), keys) == [True] * 3
        r.request_rebuild()              # works over a repaired counter
    finally:
        r.close()
        w.close()
        cli.close()


def test_one_malformed_entry_misses_alone(tmp_path, server, ns):
    w, walloc = open_backend(tmp_path, server, ns, "w0")
    r, ralloc = open_backend(tmp_path, server, ns, "r0")
    cli = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        keys = [key(i) for i in range(9)]
        put(w, walloc, keys)
        w.stop_housekeeping()
        e = lambda i: f"{ns}:e:{keys[i].to_string()}"   # noqa: E731
        cli.delete(e(0))
        cli.set(e(0), "a string where a hash belongs")
        cli.hdel(e(2), "g")
        cli.hset(e(4), "sh", str(1 << 40))                    # a huge shape
        g5 = cli.hget(e(6), "g")
        cli.delete(f"{ns}:l:w0:{g5}")
        cli.lpush(f"{ns}:l:w0:{g5}", "x")                     # a wrong-type lease set
        cli.hset(e(8), "o", "not-an-offset")
        got = check(r.batched_get_blocking(keys), keys)
        assert got == [None, True, None, True, None, True, True, True, None]
        assert r.batched_contains(keys[:1]) == 0 and r.batched_exists(keys[:2]) == [False, True]
        assert r.stats["remote_hits"] == 5
    finally:
        cli.close()
        r.close()
        w.close()


def test_keys_after_close_raises_like_every_other_call(tmp_path, server, ns):
    w, walloc = open_backend(tmp_path, server, ns, "w0")
    put(w, walloc, [key(1)])
    assert w.keys() == [key(1)]
    w.close()
    with pytest.raises(ClosedError):
        w.keys()


def test_contains_hot_asks_the_disk_tier_for_a_tp_chunk(tmp_path, server):
    """A world_size=2 chunk whose other shard was never stored is not there, even asked of Hot."""
    cfg = make_cfg(tmp_path / "shared", server.url, 16).replace(local_cpu=True, max_local_cpu_size=0.004,
                                                                 slab_size=0.016)
    with StorageManager(cfg) as sm:
        k0 = key(7, ws=2, rank=0)
        o = sm.allocate((1024,), torch.float32)
        o.tensor.fill_(3.0)
        sm.put(k0, o)
        sm.disk.wait_for_puts(10)
        deadline = time.monotonic() + 10
        while not sm.contains(k0, ["Hot"]) and not sm.hot.contains(k0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sm.hot.contains(k0)                   # this rank's copy is in the hot tier
        assert sm.contains(k0, ["Hot"]) is False     # but rank 1's shard was never stored
        assert sm.contains(k0) is False


def test_a_copied_cache_directory_gets_its_own_identity(tmp_path, server):
    """``cp -a`` of a shared directory copies ``cache-id``: the copy must not take over the
    original's namespace (and with it the original's writer ids in Redis)."""
    import shutil
    from gds_kvcache.shared.identity import cache_id
    a = tmp_path / "a"
    w, walloc = open_backend(tmp_path / "orig", server, None, "w0")
    try:
        keys = [key(i) for i in range(6)]
        put(w, walloc, keys)
        src = tmp_path / "orig" / "shared"
        shutil.copytree(src, a, symlinks=True, copy_function=shutil.copy2)
        assert cache_id(str(a)) != cache_id(str(src))
        assert cache_id(str(a)) == cache_id(str(a))              # stable once settled
        cfg = make_cfg(a, server.url)
        alloc = SlabMemoryAllocator(16 * MiB, "host")
        from gds_kvcache.shared import SharedDiskBackend
        c = SharedDiskBackend(cfg, None, alloc, writer_id="w0")  # the copy's writer w0
        try:
            # the original's reader still hits only the original's chunks, all of them
            r, ralloc = open_backend(tmp_path / "orig", server, None, "r0")
            assert check(r.batched_get_blocking(keys), keys) == [True] * 6
            assert r.stats["remote_hits"] == 6
            r.close()
        finally:
            c.close()
            alloc.close()
    finally:
        w.close()


def test_redis_lost_while_a_writer_is_down_a_live_process_republishes_its_chunks(tmp_path, ns):
    from gds_kvcache.shared import LocalRedis, find_redis_server
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    with LocalRedis() as srv:
        w, walloc = open_backend(tmp_path, srv, ns, "w0", tick=0.05)
        keys = [key(i) for i in range(40)]
        put(w, walloc, keys)
        w.close()                                   # the node goes away for good
        rd, ralloc = open_backend(tmp_path, srv, ns, "r1", tick=0.05)
        try:
            assert check(rd.batched_get_blocking(keys[:4]), keys[:4]) == [True] * 4
            srv.restart()                           # Redis loses everything while w0 is down
            deadline = time.monotonic() + 30
            while rd.batched_contains(keys) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rd.batched_contains(keys) == 40 and rd.stats["adopted"] >= 40
            assert check(rd.batched_get_blocking(keys), keys) == [True] * 40
            # the writer comes back after all: its own run wins, its chunks stay readable
            w2, walloc2 = open_backend(tmp_path, srv, ns, "w0", tick=0.05)
            try:
                assert check(rd.batched_get_blocking(keys), keys) == [True] * 40
                put(w2, walloc2, [key(100)])
                assert check(rd.batched_get_blocking([key(100)]), [key(100)]) == [True]
            finally:
                w2.close()
        finally:
            rd.close()


def test_a_claim_without_expiry_does_not_block_its_key(tmp_path, server, ns):
    w, walloc = open_backend(tmp_path, server, ns, "w0")
    cli = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        cli.set(f"{ns}:c:{key(3).to_string()}", "someone-gone")     # no PX: would block for good
        assert put(w, walloc, [key(3)]) == [16384]
        assert w.batched_contains([key(3)]) == 1
    finally:
        cli.close()
        w.close()


def test_entries_lost_while_the_epoch_survives_are_published_again(tmp_path, server, ns):
    w, walloc = open_backend(tmp_path, server, ns, "w0", tick=0.05)
    cli = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        keys = [key(i) for i in range(20)]
        put(w, walloc, keys)
        for k in keys[::2]:                        # a maxmemory eviction or a hand-made delete
            cli.delete(f"{ns}:e:{k.to_string()}")
        cli.hdel(f"{ns}:e:{keys[1].to_string()}", "cs")   # and an entry left incomplete
        deadline = time.monotonic() + 30
        while w.batched_contains(keys) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.batched_contains(keys) == 20 and w.stats["audit_republished"] >= 11
    finally:
        cli.close()
        w.close()


def test_redis_back_with_an_older_state_is_detected_and_republished(tmp_path, server, ns):
    """A snapshot restored (or a replica that lags) lists what was retracted since and lacks what
    was published since: the writer's counter shows it went back; it purges and re-publishes."""
    w, walloc = open_backend(tmp_path, server, ns, "w0", tick=0.05)
    cli = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        put(w, walloc, [key(i) for i in range(4)])
        old = {k: cli.dump(k) for k in cli.scan_iter(f"{ns}:*")}       # the "snapshot"
        put(w, walloc, [key(i) for i in range(4, 8)])
        w.remove(key(0))
        for k in list(cli.scan_iter(f"{ns}:*")):                       # restore the older state
            if k not in old:
                cli.delete(k)
        for k, v in old.items():
            cli.restore(k, 0, v, replace=True)
        assert cli.exists(f"{ns}:e:{key(0).to_string()}")            # the removed one is back...
        deadline = time.monotonic() + 30
        while (w.stats["state_went_back"] == 0 or w.batched_contains([key(i) for i in range(4, 8)]) < 4
               or w.batched_exists([key(0)]) != [False]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.stats["state_went_back"] >= 1
        assert w.batched_exists([key(0)]) == [False]                 # ...and gone again
        assert w.batched_contains([key(i) for i in range(1, 8)]) == 7
    finally:
        cli.close()
        w.close()

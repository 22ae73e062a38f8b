"""Shared mode under chaos: three processes, one directory, one Redis, with SIGKILLs and a Redis restart.

Run alone: ``python -m pytest tests/test_shared_chaos.py -q -p no:cacheprovider`` (about a minute
on 2 cores). A child is ``python -m tests.test_shared_chaos child '<json>'``.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from gds_kvcache.shared import LocalRedis, RedisIndex, find_redis_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = 10_000          # over all three processes
KEYS = 300            # overlapping key space
DISK_MIB = 2          # per writer: ~110 chunks of 16 KiB, so eviction never stops


def _write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def child(args: dict) -> int:
    import torch

    from gds_kvcache import SlabMemoryAllocator

    from .test_shared_backend import check, chunk_bytes, key, open_backend

    class Srv:
        url = args["url"]

    import pathlib
    b, alloc = open_backend(pathlib.Path(args["dir"]), Srv, args["ns"], args["wid"], disk_mib=DISK_MIB,
                            slab_mib=8, lease_ttl=args["lease_ttl"], tick=0.05)
    assert isinstance(alloc, SlabMemoryAllocator)
    b._hold_s = args["hold_s"]
    rng = random.Random(args["seed"])
    wrong = hits = misses = 0
    done = args["start"]

    def progress(final=False):
        _write_json(args["out"], {"done": done, "wrong": wrong, "hits": hits, "misses": misses, "final": final,
                                  "stats": b.stats, "keys": [k.to_string() for k in b.keys()] if final else []})

    def verify(objs, ks):
        nonlocal wrong, hits, misses
        for o, k in zip(objs, ks):
            if o is None:
                misses += 1
                continue
            if torch.equal(o.tensor.view(torch.uint8), chunk_bytes(k).view(torch.uint8)):
                hits += 1
            else:
                wrong += 1
            o.ref_count_down()

    while done < args["ops"]:
        op = rng.random()
        ks = [key(rng.randrange(KEYS)) for _ in range(rng.randint(1, 4))]
        if op < 0.3:
            from .test_shared_backend import put
            put(b, alloc, ks)
        elif op < 0.6:
            verify(b.batched_get_blocking(ks), ks)
        elif op < 0.75:
            verify(b.batched_submit_prefetch_task(ks).result(), ks)
        elif op < 0.85:
            b.remove(ks[0])
        else:
            b.batched_contains(ks)
        done += 1
        if done % 50 == 0:
            progress()
    assert check([], []) == []
    progress(final=True)
    while not os.path.exists(args["stop"]):
        time.sleep(0.05)
    b.memcheck()
    b.close()
    return 0


def _spawn(args):
    # stderr to a file: a pipe nobody drains would block a child that logs many warnings
    with open(args["out"] + ".err", "a") as err:
        return subprocess.Popen([sys.executable, "-m", "tests.test_shared_chaos", "child", json.dumps(args)],
                                cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "error"},
                                stdout=subprocess.DEVNULL, stderr=err)


def _err(args):
    with open(args["out"] + ".err") as f:
        return f.read()[-3000:]


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {"done": 0, "wrong": 0, "final": False}


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary: install Debian's redis-server "
                    "(scripts/ci-redis.sh does) or set GDS_KVCACHE_REDIS_SERVER")
def test_three_processes_kill_writer_kill_leaseholder_restart_redis(tmp_path):
    srv = LocalRedis()
    ns = "chaos" + uuid.uuid4().hex[:8]
    stop = tmp_path / "stop"
    per = OPS // 3
    procs, outs, args = {}, {}, {}
    report = {}
    try:
        for i in range(3):
            outs[i] = str(tmp_path / f"out{i}.json")
            args[i] = {"url": srv.url, "ns": ns, "dir": str(tmp_path), "wid": f"w{i}", "seed": i,
                       "ops": per + (OPS - 3 * per if i == 2 else 0), "start": 0, "out": outs[i],
                       "stop": str(stop), "lease_ttl": 2.0, "hold_s": 0.02 if i == 1 else 0.01}
            procs[i] = _spawn(args[i])
        done = lambda i: _read(outs[i])["done"]   # noqa: E731
        seen_wrong = 0

        # 1. SIGKILL writer w0 mid-run; restart it on its directory with the rest of its ops.
        _wait(lambda: done(0) >= per // 4, 300, "w0 progress")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        last = _read(outs[0])
        seen_wrong += last["wrong"]
        args[0].update(seed=10, start=last["done"])
        procs[0] = _spawn(args[0])

        # 2. SIGKILL reader w1 while Redis shows it holding leases.
        r = RedisIndex(srv.url, ns)
        _wait(lambda: done(1) >= per // 3, 300, "w1 progress")

        def w1_holds():
            for lk in r.client.scan_iter(f"{ns}:l:*", count=1000):
                if any(m.startswith("w1:") for m in r.client.zrange(lk, 0, -1)):
                    return True
            return False
        _wait(w1_holds, 120, "w1 to hold a lease")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        report["leases_left_by_killed_reader"] = sum(
            1 for lk in r.client.scan_iter(f"{ns}:l:*") for m in r.client.zrange(lk, 0, -1) if m.startswith("w1:"))
        last = _read(outs[1])
        seen_wrong += last["wrong"]
        args[1].update(seed=11, start=last["done"], hold_s=0.01)
        procs[1] = _spawn(args[1])

        # 3. Restart Redis empty while all three run.
        _wait(lambda: done(2) >= per * 2 // 3, 300, "w2 progress")
        srv.restart()
        t_restart = time.monotonic()
        r = RedisIndex(srv.url, ns)
        _wait(lambda: all(r.client.exists(f"{ns}:w:w{i}") for i in range(3)), 60,
              "every writer to re-register after the Redis restart")
        report["reregistered_within_s"] = round(time.monotonic() - t_restart, 2)

        # All finish their operations; none may have died.
        def finished():
            for i, p in procs.items():
                assert p.poll() is None, f"child {i} exited early ({p.returncode}): {_err(args[i])}"
            return all(_read(outs[i]).get("final") for i in procs)
        _wait(finished, 600, "the children to finish")
        results = {i: _read(outs[i]) for i in procs}

        # The index is complete again: every chunk each writer holds is listed (by it, or by the
        # writer that published that key first).

        def complete():
            for i, res in results.items():
                keys = res["keys"]
                ws = r.client.pipeline()
                for k in keys:
                    ws.hget(f"{ns}:e:{k}", "w")
                if any(w is None for w in ws.execute()):
                    return False
            return True
        _wait(complete, 60, "Redis to list every writer's chunks again")
        report["rebuilt_within_s"] = round(time.monotonic() - t_restart, 2)

        # Every chunk Redis lists is readable, with the right bytes, by a fresh process.
        listed = [k[len(ns) + 3:] for k in r.client.scan_iter(f"{ns}:e:*", count=1000)]
        from gds_kvcache.key import CacheEngineKey

        from .test_shared_backend import check, open_backend
        rd, _ = open_backend(tmp_path, srv, ns, "checker")
        ks = [CacheEngineKey.from_string(k) for k in listed]
        got = []
        for i in range(0, len(ks), 32):
            got += check(rd.batched_get_blocking(ks[i:i + 32]), ks[i:i + 32])
        rd.close()
        report.update(listed=len(listed), readable=got.count(True),
                      ops=sum(res["done"] for res in results.values()),
                      hits=sum(res["hits"] for res in results.values()),
                      evictions=sum(res["stats"]["shared_evictions"] for res in results.values()),
                      leased_evictions=sum(res["stats"]["leased_evictions"] for res in results.values()),
                      remote_corrupt=sum(res["stats"]["remote_corrupt"] for res in results.values()),
                      claims_lost=sum(res["stats"]["claims_lost"] for res in results.values()),
                      remote_hits=sum(res["stats"]["remote_hits"] for res in results.values()))
        print("chaos:", json.dumps(report))
        assert seen_wrong + sum(res["wrong"] for res in results.values()) == 0
        # The checksum is the last line of defence, not the only one: leases and generations
        # must keep every reader off reused extents, so no read ever fails its checksum.
        assert report["remote_corrupt"] == 0
        assert report["ops"] >= OPS
        assert report["leases_left_by_killed_reader"] > 0
        assert got.count(True) == len(listed) > 0
        assert report["remote_hits"] > 0 and report["evictions"] > 0
        stop.touch()
        for i, p in procs.items():
            assert p.wait(120) == 0, f"child {i}: {_err(args[i])}"
        r.close()
    finally:
        stop.touch()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        srv.stop()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    sys.exit(child(json.loads(sys.argv[2])))

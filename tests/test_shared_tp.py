"""Tensor-parallel consistency in shared mode: four rank processes, one Redis; a lookup answers for
all ranks, so every rank's answer agrees and every promised chunk loads on every rank.

``run_tp`` takes each rank's slab memory: host here, CUDA in ``tests/test_shared_gpu.py``.
A child is ``python -m tests.test_shared_tp child '<json>'``.
"""

import json
import os
import random
import subprocess
import sys
import time
import uuid

import pytest

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from gds_kvcache.shared import LocalRedis, RedisIndex, SharedDiskBackend, find_redis_server  # noqa: E402

from .test_shared_backend import key  # noqa: E402
from .test_shared_chaos import NO_REDIS, check_bytes, child_env, device_of, open_shared, put_chunks  # noqa: E402

__all__ = ["run_tp"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 4
PHASES = 10
CHUNKS = 12


def _barrier(client, ns, name, n=RANKS, timeout=300.0):     # a bound for hangs: 4 starts on 2 loaded cores are slow
    client.incr(f"{ns}:barrier:{name}")
    deadline = time.monotonic() + timeout
    while int(client.get(f"{ns}:barrier:{name}") or 0) < n:
        assert time.monotonic() < deadline, f"barrier {name} timed out"
        time.sleep(0.005)


def child(args: dict) -> int:
    import pathlib

    rank, ns = args["rank"], args["ns"]
    b, alloc = open_shared(pathlib.Path(args["dir"]), args["url"], ns, f"rank{rank}", args["memory"],
                           args["device"], args["engine"], disk_mib=4, tick=0.05)
    client = b.redis.client
    client.hset(f"{ns}:device", rank, str(alloc.device))
    mine = [key(c, RANKS, rank) for c in range(CHUNKS)]
    for phase in range(PHASES):
        rng = random.Random(phase * 100 + rank)
        # Mutate: store a random subset of this rank's shards, drop a few others.
        put_chunks(b, alloc, [k for k in mine if rng.random() < 0.8])
        for k in mine:
            if rng.random() < 0.1:
                b.remove(k)
        _barrier(client, ns, f"mutated{phase}")
        n = b.batched_contains(mine)
        client.hset(f"{ns}:answer:{phase}", rank, n)
        # Every chunk promised loads on this rank (its own shard).
        assert check_bytes(b.batched_get_blocking(mine[:n]), mine[:n]) == [True] * n, f"rank {rank} phase {phase}"
        _barrier(client, ns, f"sampled{phase}")
    # Exit only once the parent took a sample while this rank was alive (the parent is the
    # barrier's last member): samples > 0 by construction, however the processes were scheduled.
    _barrier(client, ns, "end", n=RANKS + 1)
    b.close()
    return 0


def run_tp(root, memories, engine="posix") -> int:
    """Four rank processes on ``root`` (rank ``r``'s slab is ``memories[r]``, a ``(memory, device)``
    pair) mutate and look up while this process samples all four ranks' lookups in one MULTI.

    Returns the number of simultaneous samples; fails when ranks disagree at any sample or a
    promised chunk does not load byte-exact on its rank.
    """
    assert len(memories) == RANKS
    with LocalRedis() as srv:
        ns = "tp" + uuid.uuid4().hex[:8]
        procs = []
        errs = []
        try:
            for r in range(RANKS):
                errs.append(open(root / f"err{r}.txt", "w"))
                a = {"url": srv.url, "ns": ns, "dir": str(root), "rank": r, "memory": memories[r][0],
                     "device": memories[r][1], "engine": engine}
                # A fresh interpreter per rank (spawn): CUDA cannot survive a fork.
                procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_shared_tp", "child", json.dumps(a)],
                                              cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=errs[-1]))
            idx = RedisIndex(srv.url, ns)
            per_rank = [[SharedDiskBackend.shards(key(c, RANKS, r)) for c in range(CHUNKS)] for r in range(RANKS)]
            # Sample all four ranks' lookups at one moment (one MULTI) while the ranks mutate.
            samples = 0
            while any(p.poll() is None for p in procs):
                p = idx.client.pipeline(transaction=True)
                for chunks in per_rank:
                    p.evalsha(idx._scripts["prefix"].sha, 0, ns, *RedisIndex._chunk_args(chunks))
                try:
                    answers = p.execute()
                except redis.exceptions.NoScriptError:
                    idx.prefix(per_rank[0])   # loads the script
                    continue
                assert len(set(answers)) == 1, f"ranks disagree at one moment: {answers}"
                samples += 1
                if samples == 1:      # the ranks wait for this before they exit (their last barrier)
                    idx.client.incr(f"{ns}:barrier:end")
                time.sleep(0.002)
            for r, p in enumerate(procs):
                errs[r].close()
                assert p.returncode == 0, open(root / f"err{r}.txt").read()[-3000:]
            # Each rank ran on the memory it was given (a CUDA run that fell back to host would prove nothing).
            devices = idx.client.hgetall(f"{ns}:device")
            assert [devices.get(str(r)) for r in range(RANKS)] == [device_of(*m) for m in memories]
            answers = [idx.client.hgetall(f"{ns}:answer:{ph}") for ph in range(PHASES)]
            for ph, a in enumerate(answers):
                assert len(a) == RANKS and len(set(a.values())) == 1, f"phase {ph}: {a}"
            assert samples > 0 and any(int(a["0"]) > 0 for a in answers)
            print(f"tp: {samples} simultaneous samples agreed on {sorted(set(devices.values()))}; "
                  f"per-phase prefixes {[a['0'] for a in answers]}")
            idx.close()
            return samples
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in errs:
                f.close()


@pytest.mark.skipif(find_redis_server() is None, reason=NO_REDIS)
def test_four_ranks_agree_at_every_sample(tmp_path):
    run_tp(tmp_path, [("host", 0)] * RANKS)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    sys.exit(child(json.loads(sys.argv[2])))

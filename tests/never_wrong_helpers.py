"""Helpers for test_never_wrong.py (small configs, random chunks, bounded waits, a lookup server that
fails or blocks, a small tmpfs) and for the bad-input tests of test_reliability.py (one check per
input class, and Hypothesis strategies that reach both the accepted and the refused side).

Everything here uses the public API only (constructors, put/get/contains/remove/close,
``MemoryObj.tensor``) and the files on disk, so the tests keep working across rewrites of the
disk tier.
"""

import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch

from gds_kvcache import (CacheEngineConfig, CacheEngineKey, LocalDiskBackend,
                         LookupServerInterface, SlabMemoryAllocator, StorageManager)
from gds_kvcache.units import GB, KiB, MiB


__all__ = ["ROOT", "gb", "disk_config", "open_backend", "manager_config", "key", "random_bytes", "put_bytes",
           "wait_put", "read_exact", "bounded", "Hang", "RecordingLookup",
           "dir_footprint", "open_in_subprocess", "warnings_from_library", "OPENED", "LOCKED",
           "check_config_input", "check_key_string", "check_load_shape", "check_metadata_junk", "config_dicts",
           "key_strings", "load_requests"]

ROOT = Path(__file__).resolve().parents[1]


def gb(nbytes: int) -> float:
    """A byte count as the GB (2**30) figure the config takes."""
    return nbytes / GB


def disk_config(d, engine="posix", disk_mib=8.0, **kw) -> CacheEngineConfig:
    kw.setdefault("io_threads", 4)
    kw.setdefault("io_task_size", 64 * KiB)
    return CacheEngineConfig(local_disk=str(d), max_local_disk_size=gb(int(disk_mib * MiB)), io_engine=engine, **kw)


def open_backend(d, engine="posix", disk_mib=8.0, slab_mib=8.0, lookup_server=None, **kw):
    """A ``LocalDiskBackend`` on ``d`` over its own host slab; returns (backend, allocator)."""
    alloc = SlabMemoryAllocator(int(slab_mib * MiB), "host")
    return LocalDiskBackend(disk_config(d, engine, disk_mib, **kw), None, alloc, "cpu", lookup_server), alloc


def manager_config(d, engine="posix", disk_mib=8.0, slab_bytes=4 * MiB, hot_bytes=None, **kw) -> CacheEngineConfig:
    """A ``StorageManager`` config with a host slab of ``slab_bytes`` and a hot tier of ``hot_bytes``."""
    hot = slab_bytes if hot_bytes is None else hot_bytes
    return disk_config(d, engine, disk_mib, memory_device="host", slab_size=gb(slab_bytes),
                       max_local_cpu_size=gb(hot), **kw)


def key(i: int, model: str = "org/model") -> CacheEngineKey:
    return CacheEngineKey("vllm", model, 1, 0, i + 1)


def random_bytes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random bytes, never all zeros (a zero-filled read must not pass for a hit)."""
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    t[0] = 1 + int(t[0]) % 255
    return t


def put_bytes(target, alloc, k, data: torch.Tensor):
    """Copy ``data`` into a new slab object and hand it to ``target`` (a backend or a manager).

    Returns the put's future (or None). The caller's reference is given up either way.
    """
    if isinstance(target, StorageManager):
        o = target.allocate(data.shape, data.dtype)
        assert o is not None, "test sizing: the slab must have room for this chunk"
        o.tensor.copy_(data)
        return target.put(k, o)  # takes over the reference
    o = alloc.allocate(data.shape, data.dtype)
    assert o is not None, "test sizing: the slab must have room for this chunk"
    o.tensor.copy_(data)
    try:
        return target.submit_put_task(k, o)
    finally:
        o.ref_count_down()


def wait_put(fut, timeout=30.0):
    """The put's result; a put that never completes is a hang, not a stuck suite."""
    if fut is None:
        return None
    try:
        return fut.result(timeout)
    except FutureTimeout:
        raise Hang(f"hang: a put's future did not complete within {timeout:.0f} s") from None


def read_exact(target, k, want: torch.Tensor):
    """'hit' (bytes exact), 'miss', or 'wrong' for ``k`` read through ``target.get``/``get_blocking``."""
    g = target.get(k) if isinstance(target, StorageManager) else target.get_blocking(k)
    if g is None:
        return "miss"
    try:
        t = g.tensor
        same = (t.shape == want.shape and t.dtype == want.dtype
                and torch.equal(t.contiguous().view(torch.uint8).cpu(), want.contiguous().view(torch.uint8).cpu()))
    finally:
        g.ref_count_down()
    return "hit" if same else "wrong"


class Hang(AssertionError):
    """A call that did not return within its bound."""


def bounded(fn, timeout: float, what: str):
    """Run ``fn()`` on a daemon thread; its result, its exception re-raised, or ``Hang`` after ``timeout`` s."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"bounded: {what}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Hang(f"hang: {what} did not return within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class RecordingLookup(LookupServerInterface):
    """A lookup server that can fail or block on purpose.

    ``fail_insert``: ``insert`` raises. ``gate``: an Event that the calls listed in ``gate_ops``
    (``("insert" | "remove", key)`` pairs) wait on, for at most ``gate_s`` s, after setting
    ``entered``. The thread that built the server (the test's own) is never held, so a library
    that notifies from the caller's thread cannot stall the test itself.
    """

    def __init__(self, fail_insert=False, gate=None, gate_ops=(), gate_s=30.0):
        self.fail_insert = fail_insert
        self.gate = gate
        self.gate_ops = set(gate_ops)
        self.gate_s = gate_s
        self.entered = threading.Event()
        self.keys = set()
        self._lock = threading.Lock()
        self._spare = threading.get_ident()

    def _wait(self, op, k):
        if self.gate is not None and (op, k) in self.gate_ops and threading.get_ident() != self._spare:
            self.entered.set()
            self.gate.wait(self.gate_s)

    def insert(self, k):
        self._wait("insert", k)
        if self.fail_insert:
            raise ConnectionError("lookup server unreachable (injected)")
        with self._lock:
            self.keys.add(k)

    def remove(self, k):
        self._wait("remove", k)
        with self._lock:
            self.keys.discard(k)

    def lookup(self, k):
        with self._lock:
            return k in self.keys


def dir_footprint(d) -> tuple[int, int]:
    """(allocated bytes of every file in ``d``, pool blocks + apparent size of every other file).

    The second figure charges metadata (index, layout, lock) at its apparent size, so a sparse or
    preallocated index cannot hide its length.
    """
    allocated = charged = 0
    for name in os.listdir(d):
        try:
            st = os.stat(os.path.join(d, name))
        except FileNotFoundError:
            continue  # a temporary file renamed away between listdir and stat
        blocks = st.st_blocks * 512
        allocated += blocks
        charged += blocks if name.startswith("kvcache.pool") else max(blocks, st.st_size)
    return allocated, charged


OPENED, LOCKED = 0, 2
_OPEN_CHILD = """
import sys
from gds_kvcache import CacheEngineConfig, DirectoryLockedError, LocalDiskBackend, SlabMemoryAllocator
cfg = CacheEngineConfig(local_disk=sys.argv[1], max_local_disk_size=float(sys.argv[2]), io_engine="posix",
                        io_threads=2)
try:
    be = LocalDiskBackend(cfg, None, SlabMemoryAllocator(1 << 20, "host"), "cpu")
except DirectoryLockedError:
    sys.exit(2)
print(len(be.keys()))
be.close()
"""


def open_in_subprocess(d, disk_gb: float, timeout=120) -> subprocess.CompletedProcess:
    """Open ``d`` as a disk tier in a fresh process: exit 0 (``OPENED``, prints the chunk count),
    2 (``LOCKED``: ``DirectoryLockedError``), anything else is a crash."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _OPEN_CHILD, str(d), repr(disk_gb)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def warnings_from_library(records) -> list:
    return [r for r in records if r.levelno >= logging.WARNING and r.name.startswith("gds_kvcache")]


# -- bad input: each check classifies one input, and fails on anything but our own error or an exact result --
def check_config_input(values: dict) -> str:
    """``"valid"`` or ``"ConfigError"`` for ``CacheEngineConfig.from_dict(values)``.

    A ConfigError must name a config field (and say it); any other exception fails. A valid
    config keeps every numeric or boolean value as given and survives a round trip.
    """
    import dataclasses

    from gds_kvcache import ConfigError

    names = {f.name for f in dataclasses.fields(CacheEngineConfig)}
    try:
        cfg = CacheEngineConfig.from_dict(values)
    except ConfigError as e:
        assert e.field in values or e.field in names, f"{values!r}: ConfigError names no field: {e}"
        assert repr(e.field) in str(e), f"{values!r}: message does not name the field: {e}"
        return "ConfigError"
    except Exception as e:
        raise AssertionError(f"{values!r} raised {type(e).__name__}: {e}, not ConfigError") from e
    for name, v in values.items():
        got = getattr(cfg, name)
        if isinstance(v, bool) or (isinstance(v, (int, float)) and not isinstance(got, bool)):
            assert got == v, f"{values!r}: {name} = {v!r} was accepted as {got!r}"
    again = CacheEngineConfig.from_dict({n: getattr(cfg, n) for n in names})
    assert again == cfg, f"{values!r}: a valid config does not round-trip"
    assert cfg.slab_bytes > 0 and cfg.slab_bytes % 4096 == 0
    return "valid"


def check_key_string(s: str) -> str:
    """``"parsed"`` (and canonical) or ``"KeyFormatError"``; anything else fails."""
    from gds_kvcache import KeyFormatError

    try:
        k = CacheEngineKey.from_string(s)
    except KeyFormatError:
        return "KeyFormatError"
    except Exception as e:
        raise AssertionError(f"{s!r} raised {type(e).__name__}: {e}, not KeyFormatError") from e
    assert k.to_string() == s, f"{s!r} parsed but is not canonical"
    return "parsed"


def check_load_shape(be, k, ref: torch.Tensor, shape, dtype) -> str:
    """Load ``k`` as ``shape``/``dtype``: ``"exact"`` (same bytes, chunk kept) or ``"ShapeMismatchError"``."""
    from gds_kvcache import ShapeMismatchError

    try:
        g = be.load_bytes_from_disk(k.to_string(), dtype, tuple(shape))
    except ShapeMismatchError:
        assert be.contains(k), "a refused load dropped the chunk"
        return "ShapeMismatchError"
    except Exception as e:
        raise AssertionError(f"load as {tuple(shape)} {dtype} raised {type(e).__name__}: {e}") from e
    assert g is not None, "an intact chunk was a miss"
    try:
        assert g.dtype == ref.dtype and torch.equal(g.tensor.reshape(-1).view(torch.uint8),
                                                    ref.reshape(-1).view(torch.uint8)), "wrong bytes"
    finally:
        g.ref_count_down()
    assert be.contains(k)
    return "exact"


def check_metadata_junk(d, junk: list, where: str, gen: torch.Generator) -> tuple[int, int, int]:
    """Store 4 chunks in ``d``, garble its metadata, reopen: (chunks checked exact, wrong, lost).

    ``where``: ``"index"`` appends the junk to every index file, ``"layout"`` replaces the layout
    file(s) with it. Opening must succeed and every chunk must come back exact.
    """
    want = {key(i): random_bytes(24 * KiB + 4096 * i + 17, gen) for i in range(4)}
    be, alloc = open_backend(d, disk_mib=4, slab_mib=1)
    for k, v in want.items():
        wait_put(put_bytes(be, alloc, k, v))
    be.close()
    blob = b"".join(junk)
    targets = [p for p in Path(d).iterdir() if (p.name.startswith("kvcache.index") if where == "index"
                                                  else "layout" in p.name) and not p.name.endswith(".tmp")]
    assert targets, f"no {where} file in {os.listdir(d)}"
    for p in targets:
        if where == "index":
            with open(p, "ab") as f:
                f.write(blob)
        else:
            p.write_bytes(blob)
    try:
        be, alloc = open_backend(d, disk_mib=4, slab_mib=1)
    except Exception as e:
        raise AssertionError(f"junk in {[p.name for p in targets]} made the directory unopenable: "
                             f"{type(e).__name__}: {e}") from e
    try:
        got = {k: read_exact(be, k, v) for k, v in want.items()}
    finally:
        be.close()
    vals = list(got.values())
    return vals.count("hit"), vals.count("wrong"), vals.count("miss")


# -- bad input: strategies that reach both sides of each property ----------------------------------------
def config_dicts():
    """Dicts of config fields, from three sources alike: arbitrary values; values inside each
    field's range (a valid config, whose values must be kept as given); and a valid dict with
    one field set near or past its limits."""
    import dataclasses

    from hypothesis import strategies as st

    from gds_kvcache.config import IO_ENGINES, MEMORY_DEVICES

    anything = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                         st.text(max_size=12), st.lists(st.integers(), max_size=2))
    flag = st.one_of(st.booleans(), st.sampled_from(["true", "False", "1", "0", "yes", "no", "on", "OFF"]))
    valid = {
        "chunk_size": st.one_of(st.integers(1, 1 << 20), st.integers(1, 4096).map(str)),
        "local_cpu": flag,
        "max_local_cpu_size": st.floats(1e-6, 1 << 20),
        "max_local_disk_size": st.floats(0, 1 << 20),
        "io_engine": st.sampled_from(IO_ENGINES),
        "io_threads": st.one_of(st.integers(1, 256), st.integers(1, 256).map(float)),
        "io_task_size": st.integers(16, 1 << 18).map(lambda n: n * 4096),
        "direct_io": flag,
        "memory_device": st.sampled_from(MEMORY_DEVICES),
        "slab_size": st.one_of(st.none(), st.floats(1e-6, 1 << 20)),
        "cuda_device": st.integers(0, 16),
        "verify_checksums": flag,
        "pool_files": st.integers(1, 64),
        "preallocate": flag,
        "extra": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    }
    near = {
        "chunk_size": st.sampled_from([0, -1, (1 << 20) + 1, 256.5, "x", "1e3"]),
        "local_cpu": st.sampled_from(["maybe", 1, 0, None, 2.0]),
        "max_local_cpu_size": st.sampled_from([0, -1e-9, (1 << 20) + 1, float("nan"), float("inf"), "big"]),
        "local_disk": st.sampled_from(["file:///tmp/kv", "/tmp/kv", "", " ", None, 5]),
        "max_local_disk_size": st.sampled_from([-1, -1e-9, float("nan"), float("inf"), "1GB"]),
        "io_engine": st.sampled_from(["gds", "", None, 3, "POSIX"]),
        "io_threads": st.sampled_from([0, -1, 257, 16.5, "x", None]),
        "io_task_size": st.sampled_from([4096, 65536 - 4096, 65537, (1 << 30) + 4096, "64k"]),
        "direct_io": st.sampled_from(["maybe", 2, None]),
        "memory_device": st.sampled_from(["gpu", "", None, 0]),
        "slab_size": st.sampled_from([0, -1, float("inf"), (1 << 20) + 1, "x"]),
        "cuda_device": st.sampled_from([-1, 1.5, "a", None]),
        "verify_checksums": st.sampled_from(["maybe", None, 3]),
        "pool_files": st.sampled_from([0, 65, -1, 8.5, "x"]),
        "preallocate": st.sampled_from(["maybe", None, 3]),
        "extra": st.sampled_from([[], None, "x", 1]),
    }
    names = sorted({f.name for f in dataclasses.fields(CacheEngineConfig)} | {"bogus_field"})
    arbitrary = st.lists(st.tuples(st.sampled_from(names), anything), max_size=5).map(dict)
    in_range = st.lists(st.sampled_from(sorted(valid)).flatmap(lambda f: st.tuples(st.just(f), valid[f])),
                        max_size=6).map(dict)
    one_off = st.tuples(in_range, st.sampled_from(sorted(near)).flatmap(
        lambda f: st.tuples(st.just(f), near[f]))).map(lambda t: {**t[0], t[1][0]: t[1][1]})
    return st.one_of(arbitrary, in_range, one_off)


def key_strings():
    """Arbitrary text, canonical key strings, and canonical key strings with one character changed."""
    from hypothesis import strategies as st

    from gds_kvcache import KeyFormatError

    @st.composite
    def canonical(draw):
        try:
            return CacheEngineKey(draw(st.text(min_size=1, max_size=8)), draw(st.text(min_size=1, max_size=40)),
                                  draw(st.integers(0, 64)), draw(st.integers(0, 64)),
                                  draw(st.integers(0, 2**256 - 1))).to_string()
        except KeyFormatError:
            return draw(st.text(max_size=40))

    @st.composite
    def edited(draw):
        s = draw(canonical())
        i = draw(st.integers(0, len(s)))
        c = draw(st.characters())
        return draw(st.sampled_from([s[:i] + c + s[i:], s[:i] + s[i + 1:], s[:i] + c + s[i + 1:]]))

    return st.one_of(st.text(max_size=300), canonical(), edited())


def load_requests(n_elements: int):
    """(shape, dtype) pairs to load a stored float16 chunk of ``n_elements`` as: arbitrary ones and ones
    whose element count matches (exact when the dtype is float16)."""
    from hypothesis import strategies as st

    dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8])
    divisors = [d for d in range(1, n_elements + 1) if n_elements % d == 0]
    same_count = st.sampled_from(divisors).flatmap(
        lambda a: st.sampled_from([x for x in divisors if (n_elements // a) % x == 0]).map(
            lambda b: [a, b, n_elements // a // b]))
    return st.one_of(st.tuples(st.lists(st.integers(0, 2000), max_size=4), dtypes),
                     st.tuples(same_count, st.one_of(st.just(torch.float16), dtypes)))

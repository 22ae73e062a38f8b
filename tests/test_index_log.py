"""The disk index's binary format (``storage/index_log.py``): round trips, crash states, corruption, versions."""

import errno
import gc
import hashlib
import json
import math
import os
import shutil
import zlib

import numpy as np
import pytest

from gds_kvcache.errors import ClosedError, IndexFormatError
from gds_kvcache.key import CacheEngineKey
from gds_kvcache.storage import index_log as il
from gds_kvcache.storage.entry import DiskEntry, IndexEntryError
from gds_kvcache.storage.index_codec import SLOT
from gds_kvcache.storage.index_log import IndexLog

DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int64": 8, "float8_e4m3fn": 1}
FMTS = ["KV_2LTD", "KV_T2D", "KV_MLA_FMT", "BINARY", "UNDEFINED"]
MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "m", "mod@l with spaces/é%2F", "x" * 150, "ü/../..@@"]


def rand_hash(rng) -> str:
    kind = rng.integers(6)
    if kind == 0:
        return rng.bytes(32).hex()[: rng.integers(33, 65)]           # wide: 33-64 digits
    if kind == 1:
        return format(int(rng.integers(0, 2**62)), "x")              # an int hash: no leading zeros
    if kind == 2:
        return "0" * int(rng.integers(1, 8)) + rng.bytes(4).hex()    # leading zeros kept
    return rng.bytes(16).hex()                                       # the library's 128-bit prefix hash


def rand_key(rng, h=None) -> CacheEngineKey:
    fmt = ["vllm", "sglang", "f/m@t"][rng.integers(3)]
    model = MODELS[rng.integers(len(MODELS))]
    return CacheEngineKey(fmt, model, int(rng.integers(1, 2**40)), int(rng.integers(0, 9)),
                          rand_hash(rng) if h is None else h)


def rand_entry(rng, key=None, offset=None) -> DiskEntry:
    dtype = list(DTYPES)[rng.integers(len(DTYPES))]
    shape = tuple(int(d) for d in rng.integers(1, 40, rng.integers(1, 5)))
    nbytes = math.prod(shape) * DTYPES[dtype]
    phys = -(-nbytes // 4096) * 4096 + 4096 * int(rng.integers(0, 3))
    off = 4096 * int(rng.integers(0, 2**38)) if offset is None else offset
    return DiskEntry(key or rand_key(rng), off, nbytes, phys, shape, dtype, FMTS[rng.integers(len(FMTS))],
                     int(rng.integers(0, 2**63)) * 2 + int(rng.integers(2)))


def fields(e: DiskEntry) -> tuple:
    return (e.key, e.offset, e.nbytes, e.phys_size, tuple(e.shape), e.dtype, e.fmt, e.checksum, e.seq)


def reopen(d) -> tuple:
    lg = IndexLog(str(d))
    try:
        got, bad = lg.load()
    finally:
        lg.close()
    return got, bad


def live_model(ops) -> list:
    """Expected live entries after ``ops`` (("put", entry) | ("del", key)), in seq order."""
    live = {}
    for op, x in ops:
        if op == "put":
            live[x.key] = x
        else:
            live.pop(x, None)
    return sorted((fields(e) for e in live.values()), key=lambda f: f[-1])


def snapshot_files(d) -> dict:
    return {n: ((d / n).read_bytes(), (d / n).stat().st_mtime_ns) for n in sorted(os.listdir(d))}


# -- round trips ------------------------------------------------------------------------------
def test_snapshot_of_columns_is_the_snapshot_of_objects(tmp_path):
    """A snapshot written from columns (``EntryColumns``: what the disk index and
    scripts/bench_reopen.py hand in) has the bytes of the snapshot of the same entries as
    objects, header generation aside; and it loads back as those entries."""
    from gds_kvcache.storage.index_codec import Tables
    from gds_kvcache.storage.index_columns import EntryColumns
    from gds_kvcache.storage.index_decode import Ops

    rng = np.random.default_rng(4)
    n = 3000
    prefix, layout = ("vllm", "meta-llama/Llama-3.1-8B", 1, 0), ((2, 32, 2, 16), "bfloat16", "KV_2LTD")
    lo = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    csum = rng.integers(0, 2**63, n).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    tables = Tables()
    ops = Ops(0)
    ops.is_put, ops.ndig, ops.lo = np.ones(n, bool), np.full(n, 32, np.uint8), lo
    ops.prefix = np.full(n, tables.prefix(prefix), np.int64)
    ops.layout = np.full(n, tables.layout(layout), np.int64)
    ops.offset = rng.permutation(n).astype(np.uint64) * np.uint64(4096)
    ops.phys = np.full(n, 4096, np.uint64)
    ops.seq = np.arange(1, n + 1, dtype=np.uint64)
    ops.csum = csum
    objects = [DiskEntry(CacheEngineKey(*prefix, bytes(lo[i]).hex()), int(ops.offset[i]), 4096, 4096, layout[0],
                         layout[1], layout[2], int(csum[i]), i + 1) for i in range(n)]
    a, b = tmp_path / "columns", tmp_path / "objects"
    for d, what in ((a, EntryColumns(ops, tables)), (b, objects)):
        d.mkdir()
        lg = IndexLog(str(d))
        lg.snapshot(what)
        lg.close()
    assert (a / il.SNAP_NAME).read_bytes()[SLOT:] == (b / il.SNAP_NAME).read_bytes()[SLOT:]
    got, bad = reopen(a)
    assert bad == 0 and [fields(e) for e in got] == [fields(e) for e in objects]


def test_round_trip_random_entries(tmp_path):
    rng = np.random.default_rng(1)
    entries = [rand_entry(rng) for _ in range(600)]
    lg = IndexLog(str(tmp_path))
    assert lg.load() == ([], 0)
    s = 0
    while s < len(entries):
        n = int(rng.integers(1, 80))
        lg.append(puts=entries[s:s + n])
        s += n
    lg.close()
    assert [e.seq for e in entries] == list(range(1, 601))
    got, bad = reopen(tmp_path)
    assert bad == 0
    assert [fields(e) for e in got] == [fields(e) for e in entries]
    for g, e in zip(got, entries):
        # Keys made in bulk are real keys: same string, hash, equality, field types.
        assert type(g.key) is CacheEngineKey and type(g.key.chunk_hash) is str
        assert g.key.to_string() == e.key.to_string() and hash(g.key) == hash(e.key)
        assert CacheEngineKey.from_string(g.key.to_string()) == g.key
        assert g.readers == 0 and g.doomed is False and type(g.shape) is tuple

    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.snapshot(reversed(got))          # any order in; seq order out
    lg.close()
    got2, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got2] == [fields(e) for e in entries]


@pytest.mark.parametrize("h", ["0", "00", "0" * 32, "f" * 32, "0" * 33, "f" * 64, "0" * 63 + "1", "0001", 0, 2**128 - 1,
                               2**256 - 1, 255])
def test_hash_edge_cases_round_trip(tmp_path, h):
    rng = np.random.default_rng(2)
    e = rand_entry(rng, CacheEngineKey("vllm", "m", 1, 0, h))
    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.append(puts=[e])
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(g) for g in got] == [fields(e)]
    lg = IndexLog(str(tmp_path))
    lg.snapshot(got)
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(g) for g in got] == [fields(e)]


def test_longest_key_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    model = "é" * 27 + "mmmm"  # "é" escapes to 6 chars: a key string of exactly the limit
    k = CacheEngineKey("vllm", model, 1, 0, rng.bytes(32).hex())
    assert len(k.to_string()) == 240
    e = rand_entry(rng, k)
    lg = IndexLog(str(tmp_path))
    lg.append(puts=[e])
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(g) for g in got] == [fields(e)]


def test_puts_dels_reputs_order(tmp_path):
    rng = np.random.default_rng(4)
    a, b, c, d, x = (rand_entry(rng) for _ in range(5))
    b2 = rand_entry(rng, b.key)
    d2 = rand_entry(rng, d.key)
    lg = IndexLog(str(tmp_path))
    lg.load()
    ops = []
    for puts, dels in [([a, b, c], []), ([], [b.key]), ([b2], [c.key]), ([d], [d.key]), ([d2, x], [x.key]),
                       ([], [c.key])]:
        lg.append(puts=puts, dels=dels)          # puts first, then dels, in one write
        ops += [("put", e) for e in puts] + [("del", k) for k in dels]
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0
    assert [fields(e) for e in got] == live_model(ops)
    assert [e.key for e in got] == [a.key, b.key, d.key]
    assert got[1].offset == b2.offset and got[2].checksum == d2.checksum


def test_snapshot_then_appends_then_load(tmp_path):
    rng = np.random.default_rng(5)
    first = [rand_entry(rng) for _ in range(100)]
    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.append(puts=first)
    lg.snapshot(first[10:])
    assert lg.records == 90
    ops = [("put", e) for e in first[10:]]
    more = [rand_entry(rng) for _ in range(30)]
    again = rand_entry(rng, first[20].key)
    lg.append(puts=more[:20], dels=[first[15].key, first[20].key, first[3].key])
    lg.append(puts=[again] + more[20:], dels=[more[0].key])
    ops += [("put", e) for e in more[:20]] + [("del", first[15].key), ("del", first[20].key), ("del", first[3].key)]
    ops += [("put", again)] + [("put", e) for e in more[20:]] + [("del", more[0].key)]
    assert lg.records == 90 + 20 + 3 + 11 + 1
    assert lg.bytes == sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path))
    s = lg.next_seq()
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == live_model(ops)
    lg = IndexLog(str(tmp_path))
    lg.load()
    assert lg.next_seq() == s    # above every seq on disk (the last delete's) after a restart
    lg.close()


def test_gc_state_restored_after_load(tmp_path):
    rng = np.random.default_rng(6)
    lg = IndexLog(str(tmp_path))
    lg.append(puts=[rand_entry(rng) for _ in range(10)])
    lg.close()
    assert gc.isenabled()
    reopen(tmp_path)
    assert gc.isenabled()
    gc.disable()
    try:
        reopen(tmp_path)
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- torn and altered records ---------------------------------------------------------------------
def test_torn_tail_at_every_byte_of_the_last_write(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    src.mkdir()
    base = [rand_entry(rng) for _ in range(12)]
    lg = IndexLog(str(src))
    lg.load()
    lg.snapshot(base[:4])
    lg.append(puts=base[4:])
    before = os.path.getsize(src / il.LOG_NAME)
    # The last write: a new key prefix and layout (table entries), a wide hash, a delete.
    last = [rand_entry(rng, CacheEngineKey("new-fmt", "new/model", 2, 1, rng.bytes(16).hex())),
            rand_entry(rng, CacheEngineKey("vllm", "m", 1, 0, "ab" * 30))]
    lg.append(puts=last, dels=[base[0].key])
    after = os.path.getsize(src / il.LOG_NAME)
    lg.close()
    ops = [("put", e) for e in base]
    states = [live_model(ops), live_model(ops + [("put", last[0])]), live_model(ops + [("put", e) for e in last]),
              live_model(ops + [("put", e) for e in last] + [("del", base[0].key)])]
    full = (src / il.LOG_NAME).read_bytes()
    # Where each record of the last write starts (table entries and wide hashes take several slots).
    starts = {o for o in range(before, after + 1, SLOT) if o == after or full[o] != ord("C")}
    extra = rand_entry(rng)
    seen = set()
    for cut in range(before, after):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        (d / il.LOG_NAME).write_bytes(full[:cut])
        got, bad = reopen(d)
        state = [fields(e) for e in got]
        assert state in states, cut          # the old state plus whole records of the torn write, never more
        seen.add(states.index(state))
        assert bad == (0 if cut in starts else 1), cut      # the torn record, once
        # Appending after a torn tail keeps the slots aligned.
        lg = IndexLog(str(d))
        lg.load()
        e = DiskEntry(extra.key, extra.offset, extra.nbytes, extra.phys_size, extra.shape, extra.dtype, extra.fmt,
                      extra.checksum)
        lg.append(puts=[e])
        lg.close()
        got2, bad2 = reopen(d)
        assert [fields(x) for x in got2] == [x for x in state if x[0] != extra.key] + [fields(e)]
        assert bad2 == 0
        shutil.rmtree(d)
    assert seen == {0, 1, 2}     # a torn delete loses the delete; the whole write reads as state 3
    got, bad = reopen(src)
    assert bad == 0 and [fields(e) for e in got] == states[3]


def test_zero_filled_tail_is_skipped(tmp_path):
    # A crash can leave the file longer with zeros where the data never landed.
    rng = np.random.default_rng(8)
    entries = [rand_entry(rng) for _ in range(5)]
    lg = IndexLog(str(tmp_path))
    lg.append(puts=entries)
    lg.close()
    with open(tmp_path / il.LOG_NAME, "ab") as f:
        f.write(bytes(3 * SLOT))
    got, bad = reopen(tmp_path)
    assert bad == 3 and [fields(e) for e in got] == [fields(e) for e in entries]


def _record_slots(path) -> list:
    """Offsets of the one-slot put records of a file."""
    data = path.read_bytes()
    return [o for o in range(SLOT, len(data), SLOT) if data[o] == ord("P")]


@pytest.mark.parametrize("name", [il.LOG_NAME, il.SNAP_NAME])
def test_flipped_bit_in_a_middle_record_skips_only_that_record(tmp_path, name):
    rng = np.random.default_rng(9)
    entries = [rand_entry(rng, rand_key(rng, rng.bytes(16).hex())) for _ in range(60)]
    src = tmp_path / "src"
    src.mkdir()
    lg = IndexLog(str(src))
    for s in range(0, 60, 20):
        lg.append(puts=entries[s:s + 20])
    if name == il.SNAP_NAME:
        lg.snapshot(entries)
    lg.close()
    data = bytearray((src / name).read_bytes())
    slots = _record_slots(src / name)
    victim = slots[len(slots) // 2]
    h = data[victim + 40:victim + 56].hex()
    gone = next(e for e in entries if e.key.chunk_hash == h)
    expected = [fields(e) for e in entries if e is not gone]
    for bit in range(SLOT * 8):
        bad_data = bytearray(data)
        bad_data[victim + bit // 8] ^= 1 << (bit % 8)
        (src / name).write_bytes(bad_data)
        got, bad = reopen(src)
        assert bad == 1, bit
        assert [fields(e) for e in got] == expected, bit


def test_flipped_bit_in_a_table_entry_drops_its_records_only(tmp_path):
    rng = np.random.default_rng(10)
    a = [rand_entry(rng, CacheEngineKey("vllm", "model-a", 1, 0, rng.bytes(16).hex())) for _ in range(5)]
    b = [rand_entry(rng, CacheEngineKey("vllm", "model-b", 1, 0, rng.bytes(16).hex())) for _ in range(5)]
    lg = IndexLog(str(tmp_path))
    lg.append(puts=a)
    lg.append(puts=b)
    lg.close()
    data = bytearray((tmp_path / il.LOG_NAME).read_bytes())
    at = data.index(b"model-b")
    data[at] ^= 0x01
    (tmp_path / il.LOG_NAME).write_bytes(data)
    got, bad = reopen(tmp_path)
    assert [fields(e) for e in got] == [fields(e) for e in a]
    assert bad == 1 + 5     # the table slot, and the records that need it
    # Appending again must not reuse the lost table id for another prefix.
    c = rand_entry(rng, CacheEngineKey("vllm", "model-c", 1, 0, rng.bytes(16).hex()))
    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.append(puts=[c])
    lg.close()
    got, bad = reopen(tmp_path)
    assert [fields(e) for e in got] == [fields(e) for e in a] + [fields(c)]


# -- unusable records ---------------------------------------------------------------------------------
def _patch(path, old: bytes, new: bytes, occurrence=0) -> None:
    """Replace bytes inside a slot and recompute that file's slot checks, as a writer would have."""
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(old, at + 1)
    data[at:at + len(old)] = new
    body = data[SLOT:]
    il._seal(body)
    path.write_bytes(bytes(data[:SLOT]) + bytes(body))


@pytest.mark.parametrize("old,new", [(b"float16", b"float99"), (b"KV_T2D", b"KV_Q9X")])
def test_unknown_dtype_or_fmt_record_is_skipped_and_counted(tmp_path, old, new):
    rng = np.random.default_rng(11)
    good = rand_entry(rng)
    good.dtype, good.fmt, good.shape, good.nbytes = "float32", "KV_2LTD", (4, 5), 80
    odd = rand_entry(rng)
    odd.dtype, odd.fmt, odd.shape, odd.nbytes = "float16", "KV_T2D", (4, 5), 40
    lg = IndexLog(str(tmp_path))
    lg.append(puts=[good, odd])
    lg.close()
    _patch(tmp_path / il.LOG_NAME, old, new)       # as a newer library version might write
    got, bad = reopen(tmp_path)
    assert bad == 1 and [fields(e) for e in got] == [fields(good)]


def _ext(data, at):
    return int.from_bytes(data[at + 16:at + 24], "little")


@pytest.mark.parametrize("what", ["phys_below_nbytes", "phys_zero", "ndig_zero", "ndig_too_short", "ndig_33",
                                  "prefix_missing", "layout_missing", "tag_unknown", "span_wrong"])
def test_impossible_record_values_are_skipped_and_counted(tmp_path, what):
    rng = np.random.default_rng(12)
    entries = [rand_entry(rng, rand_key(rng, rng.bytes(16).hex())) for _ in range(3)]
    entries[1].shape, entries[1].dtype, entries[1].nbytes, entries[1].phys_size = (3, 4096), "uint8", 3 * 4096, 3 * 4096
    lg = IndexLog(str(tmp_path))
    lg.append(puts=entries)
    lg.close()
    path = tmp_path / il.LOG_NAME
    data = bytearray(path.read_bytes())
    at = _record_slots(path)[1]
    ext = _ext(data, at)
    if what == "phys_below_nbytes":
        ext = (ext & ((1 << 40) - 1)) | (2 << 40)
    elif what == "phys_zero":
        ext &= (1 << 40) - 1
    if what in ("phys_below_nbytes", "phys_zero"):
        data[at + 16:at + 24] = ext.to_bytes(8, "little")
    elif what == "ndig_zero":
        data[at + 1] = 0
    elif what == "ndig_too_short":
        data[at + 1] = 5            # the stored hash has more significant digits than that
    elif what == "ndig_33":
        data[at + 1] = 33           # a one-slot record cannot hold 33 digits
    elif what == "prefix_missing":
        data[at + 8:at + 12] = (7).to_bytes(4, "little")
    elif what == "layout_missing":
        data[at + 12:at + 16] = (9).to_bytes(4, "little")
    elif what == "tag_unknown":
        data[at] = ord("Z")
    elif what == "span_wrong":
        data[at + 2] = 3
    body = data[SLOT:]
    il._seal(body)
    path.write_bytes(bytes(data[:SLOT]) + bytes(body))
    got, bad = reopen(tmp_path)
    assert bad == 1
    assert [fields(e) for e in got] == [fields(entries[0]), fields(entries[2])]


def test_append_refuses_impossible_entries_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(13)
    lg = IndexLog(str(tmp_path))
    lg.append(puts=[rand_entry(rng)])
    size = lg.bytes
    cases = []
    for change in [dict(nbytes=7), dict(dtype="float99"), dict(fmt="NOPE"), dict(offset=100), dict(offset=-4096),
                   dict(phys_size=0), dict(phys_size=4097), dict(checksum=-1), dict(checksum=2**64),
                   dict(shape=(2, -3)), dict(shape=(0, 5), nbytes=0), dict(offset=il.MAX_OFFSET + 4096)]:
        e = rand_entry(rng)
        for k, v in change.items():
            setattr(e, k, v)
        cases.append(e)
    for e in cases:
        with pytest.raises(IndexEntryError):
            lg.append(puts=[rand_entry(rng), e])
        with pytest.raises(IndexEntryError):
            lg.snapshot([rand_entry(rng), e])
    with pytest.raises(IndexEntryError):
        lg.append(dels=["not-a-key"])
    assert lg.bytes == size == os.path.getsize(tmp_path / il.LOG_NAME)
    assert not os.path.exists(tmp_path / il.SNAP_NAME)
    lg.close()
    assert reopen(tmp_path)[1] == 0


def test_failed_write_is_rolled_back(tmp_path, monkeypatch):
    rng = np.random.default_rng(14)
    first = rand_entry(rng)
    lg = IndexLog(str(tmp_path))
    lg.append(puts=[first])
    size = os.path.getsize(tmp_path / il.LOG_NAME)
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data)[:len(data) // 2])      # part lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    later = [rand_entry(rng, CacheEngineKey("other", "model", 3, 2, rng.bytes(16).hex())) for _ in range(3)]
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        lg.append(puts=later)
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(tmp_path / il.LOG_NAME) == size
    assert all(e.seq == 0 for e in later)
    lg.append(puts=later)         # the table entries are written again with this batch
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == [fields(e) for e in [first] + later]


def test_fingerprint_collisions_are_settled_exactly(tmp_path, monkeypatch):
    rng = np.random.default_rng(15)
    entries = [rand_entry(rng) for _ in range(40)]
    lg = IndexLog(str(tmp_path))
    lg.append(puts=entries)
    lg.append(dels=[e.key for e in entries[::3]])
    back = rand_entry(rng, entries[3].key)
    lg.append(puts=[back])
    lg.close()
    ops = [("put", e) for e in entries] + [("del", e.key) for e in entries[::3]] + [("put", back)]
    real = il._mix
    # Every key gets the same fingerprint (slot checks, with 6-7 columns, stay real).
    monkeypatch.setattr(il, "_mix", lambda cols: np.zeros(cols[0].shape[0], np.uint64) if len(cols) in (3, 5)
                        else real(cols))
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == live_model(ops)


# -- versions and foreign files ------------------------------------------------------------------------
def _make_index(d, rng):
    lg = IndexLog(str(d))
    lg.append(puts=[rand_entry(rng) for _ in range(5)])
    lg.snapshot(lg.load()[0])
    lg.append(puts=[rand_entry(rng) for _ in range(3)])
    lg.close()


def _set_version(path, version):
    data = bytearray(path.read_bytes())
    data[8:12] = version.to_bytes(4, "little")
    head = bytes(data[:SLOT - 8]) + bytes(8)
    data[SLOT - 8:SLOT] = il._header_check(head).to_bytes(8, "little")
    path.write_bytes(data)


@pytest.mark.parametrize("name", [il.SNAP_NAME, il.LOG_NAME])
@pytest.mark.parametrize("change", ["newer", "older", "foreign"])
def test_unknown_version_or_foreign_magic_refused_and_untouched(tmp_path, name, change):
    rng = np.random.default_rng(16)
    _make_index(tmp_path, rng)
    path = tmp_path / name
    if change == "foreign":
        data = bytearray(path.read_bytes())
        data[:8] = b"SQLite f"
        path.write_bytes(data)
    else:
        _set_version(path, 3 if change == "newer" else 0)
    before = snapshot_files(tmp_path)
    for call in [lambda lg: lg.load(), lambda lg: lg.append(puts=[rand_entry(rng)]), lambda lg: lg.next_seq(),
                 lambda lg: lg.snapshot([rand_entry(rng)])]:
        lg = IndexLog(str(tmp_path))
        with pytest.raises(IndexFormatError) as ei:
            call(lg)
        lg.close()
        msg = str(ei.value)
        assert str(path) in msg
        if change == "foreign":
            assert "magic" in msg
        else:
            assert f"version {3 if change == 'newer' else 0}" in msg and f"version {il.INDEX_VERSION}" in msg
        assert snapshot_files(tmp_path) == before


# -- the JSON-lines index of version 1 -------------------------------------------------------------------
def _legacy_line(rec: dict) -> bytes:
    payload = json.dumps(rec, separators=(",", ":")).encode()
    return payload + b"\t" + format(zlib.crc32(payload), "08x").encode() + b"\n"


def _legacy_put(e: DiskEntry) -> dict:
    return {"op": "put", "key": e.key.to_string(), "off": e.offset, "n": e.nbytes, "phys": e.phys_size,
            "shape": list(e.shape), "dtype": e.dtype, "fmt": e.fmt, "csum": format(e.checksum, "016x"), "seq": e.seq}


def test_old_json_index_is_migrated(tmp_path):
    rng = np.random.default_rng(17)
    a, b = rand_entry(rng), rand_entry(rng)
    a.seq, b.seq = 1, 2
    text = (_legacy_line({"magic": "gds_kvcache-index", "version": 1}) + _legacy_line(_legacy_put(a))
            + _legacy_line(_legacy_put(b)) + _legacy_line({"op": "del", "key": a.key.to_string(), "seq": 3}))
    (tmp_path / il.LEGACY_NAME).write_bytes(text)
    lg = IndexLog(str(tmp_path))
    got, bad = lg.load()
    assert bad == 0 and [fields(e) for e in got] == [fields(b)]
    assert lg.bytes == len(text)
    assert lg.next_seq() == 4
    # Appends before the first snapshot go to a log that extends the JSON index.
    c = rand_entry(rng)
    lg.append(puts=[c])
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == [fields(b), fields(c)]
    lg = IndexLog(str(tmp_path))
    got, _ = lg.load()
    lg.snapshot(got)
    lg.close()
    assert not (tmp_path / il.LEGACY_NAME).exists()
    assert sorted(os.listdir(tmp_path)) == [il.LOG_NAME, il.SNAP_NAME]
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == [fields(b), fields(c)]


def test_old_json_index_unusable_lines_are_counted(tmp_path):
    rng = np.random.default_rng(18)
    good, bad_shape, misaligned, odd_dtype = (rand_entry(rng) for _ in range(4))
    for i, e in enumerate((good, bad_shape, misaligned, odd_dtype)):
        e.seq = i + 1
    r1 = _legacy_put(bad_shape)
    r1["n"] += 1                        # prod(shape) * itemsize != nbytes
    r2 = _legacy_put(misaligned)
    r2["off"] += 512
    r3 = _legacy_put(odd_dtype)
    r3["dtype"] = "float99"
    altered = bytearray(_legacy_line(_legacy_put(rand_entry(rng))))
    altered[20] ^= 1                    # its CRC no longer matches
    text = (_legacy_line({"magic": "gds_kvcache-index", "version": 1}) + _legacy_line(_legacy_put(good))
            + _legacy_line(r1) + _legacy_line(r2) + _legacy_line(r3) + bytes(altered) + b'{"op":"pu')
    (tmp_path / il.LEGACY_NAME).write_bytes(text)
    got, bad = reopen(tmp_path)
    assert [fields(e) for e in got] == [fields(good)] and bad == 5


@pytest.mark.parametrize("first", [{"magic": "gds_kvcache-index", "version": 2}, {"magic": "other", "version": 1}])
def test_old_json_index_of_unknown_version_refused_and_untouched(tmp_path, first):
    rng = np.random.default_rng(19)
    (tmp_path / il.LEGACY_NAME).write_bytes(_legacy_line(first) + _legacy_line(_legacy_put(rand_entry(rng))))
    before = snapshot_files(tmp_path)
    for call in [lambda lg: lg.load(), lambda lg: lg.snapshot([])]:
        lg = IndexLog(str(tmp_path))
        with pytest.raises(IndexFormatError, match="kvcache.index"):
            call(lg)
        assert snapshot_files(tmp_path) == before


# -- crash during snapshot -----------------------------------------------------------------------------
def _two_states(d, rng):
    """An index at state "old" whose log would, replayed over the new snapshot, resurrect and lose keys."""
    a, b, c, x = (rand_entry(rng) for _ in range(4))
    lg = IndexLog(str(d))
    lg.load()
    lg.append(puts=[a, b, c])
    lg.snapshot([a, b, c])
    lg.append(dels=[a.key])          # old log: a deleted, x put
    lg.append(puts=[x])
    old, _ = lg.load()
    a2 = rand_entry(rng, a.key)
    lg.append(puts=[a2])             # the caller puts a back, then deletes x, and snapshots
    lg.append(dels=[x.key])
    new, _ = lg.load()
    lg.close()
    # Rebuild "old" on disk exactly: snapshot [a, b, c], log: del a, put x.
    for n in os.listdir(d):
        os.unlink(d / n)
    lg = IndexLog(str(d))
    lg.load()
    lg.snapshot([a, b, c])
    lg.append(dels=[a.key])
    lg.append(puts=[x])
    assert [fields(e) for e in lg.load()[0]] == [fields(e) for e in old]
    return lg, [fields(e) for e in old], [fields(e) for e in new], new


class Crash(Exception):
    pass


def _crash_at(monkeypatch, n):
    """Make the n-th (0-based) rename or directory fsync of the module raise Crash."""
    calls = [0]
    real_replace, real_fsync_dir = os.replace, il._fsync_dir

    def step(real):
        def f(*a):
            calls[0] += 1
            if calls[0] == n + 1:
                raise Crash()
            return real(*a)
        return f

    monkeypatch.setattr(il.os, "replace", step(real_replace))
    monkeypatch.setattr(il, "_fsync_dir", step(real_fsync_dir))
    return calls


def test_crash_at_every_step_of_a_snapshot_leaves_old_or_new_state(tmp_path, monkeypatch):
    rng = np.random.default_rng(20)
    outcomes = []
    for n in range(6):
        d = tmp_path / f"crash{n}"
        d.mkdir()
        lg, old, new, new_entries = _two_states(d, rng)
        # Make the legacy file exist too, so its deletion is a step of its own.
        (d / il.LEGACY_NAME).write_bytes(_legacy_line({"magic": "gds_kvcache-index", "version": 1}))
        with monkeypatch.context() as m:
            calls = _crash_at(m, n)
            try:
                lg.snapshot(new_entries)
                crashed = False
            except Crash:
                crashed = True
        lg.close()
        got, bad = reopen(d)
        state = [fields(e) for e in got]
        assert bad == 0
        # Steps: snapshot rename, dir fsync, log rename, dir fsync, dir fsync after legacy unlink.
        assert state == (old if n == 0 else new), (n, calls)
        outcomes.append((crashed, state == new))
        # Whatever state it came back in, the index keeps working.
        e = rand_entry(rng)
        lg = IndexLog(str(d))
        lg.load()
        lg.append(puts=[e])
        lg.close()
        got, bad = reopen(d)
        assert bad == 0 and [fields(x) for x in got] == state + [fields(e)]
    assert outcomes[0] == (True, False) and all(c for c, _ in outcomes[:5]) and outcomes[5] == (False, True)


def test_stray_temp_files_are_ignored_and_replaced(tmp_path):
    rng = np.random.default_rng(21)
    lg, old, new, new_entries = _two_states(tmp_path, rng)
    lg.close()
    (tmp_path / (il.SNAP_NAME + ".tmp")).write_bytes(os.urandom(1000))
    (tmp_path / (il.LOG_NAME + ".tmp")).write_bytes(b"")
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(e) for e in got] == old
    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.snapshot(new_entries)
    lg.close()
    assert sorted(os.listdir(tmp_path)) == [il.LOG_NAME, il.SNAP_NAME]
    assert [fields(e) for e in reopen(tmp_path)[0]] == new


def test_corrupt_header_gives_an_empty_index_that_stays_empty(tmp_path):
    rng = np.random.default_rng(22)
    _make_index(tmp_path, rng)
    data = bytearray((tmp_path / il.LOG_NAME).read_bytes())
    data[20] ^= 0x10            # the log's generation: it can no longer be paired with the snapshot
    (tmp_path / il.LOG_NAME).write_bytes(data)
    lg = IndexLog(str(tmp_path))
    got, bad = lg.load()
    assert got == [] and bad > 0
    e = rand_entry(rng)
    lg.append(puts=[e])         # must not bring the snapshot's entries back
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and [fields(x) for x in got] == [fields(e)]


# -- size -------------------------------------------------------------------------------------------------
def _prefix_hash_keys(n):
    prev = b"seed"
    for i in range(n):
        prev = hashlib.blake2b(prev + i.to_bytes(8, "little"), digest_size=16).digest()
        yield CacheEngineKey("vllm", "meta-llama/Llama-3.1-8B-Instruct", 4, i % 4, prev.hex())


def test_at_most_64_bytes_per_record_for_128_bit_hashes(tmp_path):
    # Chunks as the library makes them: one full-chunk shape, a few partial last chunks.
    rng = np.random.default_rng(23)
    shapes = [(2, 32, 256, 1024)] * 5 + [(2, 32, int(t), 1024) for t in rng.integers(1, 256, 4)]
    entries = []
    for i, k in enumerate(_prefix_hash_keys(1000)):
        shape = shapes[i % len(shapes)]
        n = 2 * math.prod(shape)
        entries.append(DiskEntry(k, 2**24 * i, n, -(-n // 4096) * 4096, shape, "bfloat16", "KV_2LTD",
                                 int(rng.integers(0, 2**63))))
    lg = IndexLog(str(tmp_path))
    lg.load()
    for s in range(0, 1000, 64):
        lg.append(puts=entries[s:s + 64])
    assert lg.records == 1000 and lg.bytes / lg.records <= 64
    tables = lg.table_bytes
    lg.snapshot(entries)
    assert lg.records == 1000 and lg.bytes / lg.records <= 64
    snap = os.path.getsize(tmp_path / il.SNAP_NAME)
    assert snap == SLOT * 1001 + tables
    assert snap <= IndexLog.size_of(1000, table_bytes=lg.table_bytes)
    assert IndexLog.size_of(1000) >= snap    # the default allowance covers these tables
    lg.close()


def test_wide_hashes_take_two_slots(tmp_path):
    rng = np.random.default_rng(24)
    entries = [rand_entry(rng, CacheEngineKey("vllm", "m", 1, 0, rng.bytes(32).hex())) for _ in range(10)]
    entries += [rand_entry(rng, CacheEngineKey("vllm", "m", 1, 0, rng.bytes(16).hex())) for _ in range(5)]
    lg = IndexLog(str(tmp_path))
    lg.snapshot(entries)
    snap = os.path.getsize(tmp_path / il.SNAP_NAME)
    assert snap == SLOT * (1 + 15 + 10) + lg.table_bytes == IndexLog.size_of(15, wide=10, table_bytes=lg.table_bytes)
    lg.close()
    got, bad = reopen(tmp_path)
    assert bad == 0 and sorted(map(fields, got), key=lambda f: f[-1]) == sorted(map(fields, entries),
                                                                               key=lambda f: f[-1])


def test_closed_log_refuses_calls(tmp_path):
    lg = IndexLog(str(tmp_path))
    lg.load()
    lg.close()
    for call in [lambda: lg.load(), lambda: lg.append(dels=[CacheEngineKey("v", "m", 1, 0, 1)]),
                 lambda: lg.snapshot([]), lambda: lg.next_seq()]:
        with pytest.raises(ClosedError):
            call()


def test_small_appends_are_sealed_as_numpy_seals_them():
    """A record or a few are sealed in Python (faster than NumPy there): the same checks, bit for bit."""
    from gds_kvcache.storage import index_codec as codec

    rng = np.random.default_rng(9)
    for n in list(range(1, 9)) * 20:
        raw = rng.integers(0, 256, n * SLOT, dtype=np.uint8)
        small = bytearray(raw.tobytes())
        codec.seal(small)
        big = raw.copy()              # an ndarray: the NumPy path, whatever its size
        codec.seal(big)
        assert bytes(small) == big.tobytes()
        assert (codec.slot_checks(codec.slot_words(big)) == np.frombuffer(small, np.uint32)[1::SLOT // 4]).all()

"""Live index entries as columns: ``EntryColumns``, the merge of operations into them, and keys made in bulk.

What ``IndexLog`` loads and snapshots without a Python object per chunk: the
decoded operations (``index_decode.Ops``, one NumPy column per field) with
the ``Tables`` their prefix and layout ids point into. :func:`live_ops` keeps
the last operation of each key where it is a put; :func:`build_entries`
makes ``DiskEntry`` objects of columns (what ``IndexLog.load`` gives and the
tests read); :func:`new_key` and :func:`hex_strings` make keys without
``CacheEngineKey.__init__`` (see :func:`build_entries`'s notes).

Invariants: of a key's operations the latest in file order wins, whatever
the fingerprint (keys sharing one are told apart exactly); live entries come
back in ``seq`` order, in file order among equal seqs.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from itertools import repeat
from typing import Optional

import numpy as np

from ..key import CacheEngineKey
from .entry import DiskEntry
from .index_codec import BUILD_BLOCK, Tables, mix
from .index_decode import Ops

__all__ = ["EntryColumns", "build_entries", "hex_strings", "key_ident", "key_template", "live_ops", "merge_order",
           "new_key", "u64_cols"]

_LOW32 = np.uint64(0xFFFFFFFF)
_KEY_FIELDS = ("fmt", "model_name", "world_size", "worker_id")


@dataclass
class EntryColumns:
    """Entries as columns: ``ops`` (puts only, in ``seq`` order) whose ids point into ``tables``."""

    ops: Ops
    tables: Tables

    def __len__(self) -> int:
        return len(self.ops)


# -- keys without their constructor ------------------------------------------------------
def key_template(fields: tuple) -> dict:
    """The instance dict of a key with prefix ``fields`` (fmt, model_name, world_size, worker_id), hash left out."""
    return dict(zip(_KEY_FIELDS, fields))


def new_key(template: dict, chunk_hash: str) -> CacheEngineKey:
    """A key of a validated prefix and a lowercase hex hash, made without re-validating them."""
    k = object.__new__(CacheEngineKey)
    d = k.__dict__
    d.update(template)
    d["chunk_hash"] = chunk_hash
    return k


def hex_strings(b: np.ndarray, ndig: np.ndarray) -> list:
    """The last ``ndig[i]`` hex digits of each row of big-endian bytes ``b``, as ``str``."""
    n, m = b.shape
    # bytes.hex over a void view loops in C: twice as fast as NumPy's unicode
    # conversion (and an "S" view would drop trailing zero bytes).
    out = list(map(bytes.hex, np.ascontiguousarray(b).view(f"V{m}").ravel().tolist()))
    short = np.flatnonzero(ndig != 2 * m)
    if short.size:
        for i, c in zip(short.tolist(), (2 * m - ndig[short].astype(np.int64)).tolist()):
            out[i] = out[i][c:]
    return out


def u64_cols(b: np.ndarray) -> list[np.ndarray]:
    """The two 64-bit words of each row of ``(n, 16)`` bytes (a view where the rows allow)."""
    w = b.view("<u8") if b.strides[-1] == 1 else np.ascontiguousarray(b).view("<u8")
    return [w[:, 0], w[:, 1]]


# -- merging -------------------------------------------------------------------------------
def key_ident(ops: Ops) -> list[np.ndarray]:
    """The columns that name each operation's key exactly (prefix and digit count, hash words)."""
    ident = [(ops.prefix.astype(np.uint64) << np.uint64(8)) | ops.ndig.astype(np.uint64)]
    ident += u64_cols(ops.lo)
    if ops.hi is not None:
        ident += u64_cols(ops.hi)
    return ident


def merge_order(ops: Ops, fingerprint) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Which of ``ops`` are live (the last operation of their key, and a put), as a mask, and the
    operations sorted by fingerprint: words of its top 32 bits over the operation's index
    (None past 2**32 operations).

    ``fingerprint`` hashes :func:`key_ident`'s columns to uint64; keys that share
    one are told apart exactly, whatever it returns.

    Notes
    -----
    One sort of 64-bit words (a third of the cost of an ``argsort``) brings
    every key's operations together; only the operations in runs of one top
    half, duplicates and the few chance collisions, are then compared
    exactly. The sorted words are what a hash table on the same fingerprint
    is built from (``EntryTable.load``).
    """
    n = len(ops)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.uint64)
    ident = key_ident(ops)
    fp = fingerprint(ident)
    packed = None
    if n <= 1 << 32:
        packed = fp                       # in place: ten million words are 80 MB a copy
        packed &= ~_LOW32
        packed |= np.arange(n, dtype=np.uint64)
        del fp
        packed.sort()
        top = packed.view(np.uint32)[1::2] if packed.dtype.byteorder in "=<" else packed >> np.uint64(32)
    else:
        order = np.argsort(fp, kind="stable")
        top = fp[order]
    same = top[1:] == top[:-1]
    del top
    keep = ops.is_put
    if same.any():
        in_run = np.zeros(n, bool)
        in_run[1:] = same
        in_run[:-1] |= same
        cand = (packed[in_run] & _LOW32).astype(np.int64) if packed is not None else order[in_run]
        gone = _superseded(cand, ident)
        if gone.size:
            keep = keep.copy()
            keep[gone] = False
    return keep, packed


def live_ops(ops: Ops, fingerprint=mix) -> Ops:
    """The last operation of each key, where it is a put, in ``seq`` order (see :func:`merge_order`)."""
    keep, _ = merge_order(ops, fingerprint)
    live = ops if keep.all() else ops.take(keep)
    seq = live.seq
    if seq.shape[0] > 1 and not (seq[1:] >= seq[:-1]).all():
        live = live.take(np.argsort(seq, kind="stable"))
    return live


def _superseded(cand: np.ndarray, ident: list[np.ndarray]) -> np.ndarray:
    """Of the operations ``cand`` (indices), those a later operation of the same key overrides."""
    cols = [c[cand] for c in ident]
    o = np.lexsort([cand] + cols[::-1])      # by key, then by position in the files
    sc = cand[o]
    last = np.ones(sc.shape[0], bool)        # the last of its key
    differ = np.zeros(sc.shape[0] - 1, bool)
    for c in cols:
        s = c[o]
        differ |= s[1:] != s[:-1]
    last[:-1] = differ
    return sc[~last]


# -- objects ---------------------------------------------------------------------------------
def build_entries(ops: Ops, tables: Tables) -> list[DiskEntry]:
    """The ``DiskEntry`` of each of ``ops`` (all valid puts), made in bulk.

    Notes
    -----
    Keys are made without ``CacheEngineKey.__init__``: their prefix was
    validated once per table entry and their hash is hex by construction,
    so the per-key checks (about 5 us a key, more than all the rest of
    the load) would only repeat themselves. Writing a new key's instance
    dict is the cheapest way to fill it (a frozen dataclass only guards
    setattr); the key equals and hashes as the constructor's would, and
    its dict is smaller than the one the constructor leaves.
    """
    n = len(ops)
    out: list[DiskEntry] = []
    if n == 0:
        return out
    new = object.__new__
    templates = [key_template(p.fields) for p in tables.prefixes]
    by_prefix = np.empty(len(templates) + 1, object)
    for i, t in enumerate(templates):
        by_prefix[i] = t     # one by one: NumPy would unpack a sequence
    by_layout = np.empty(len(tables.layouts) + 1, object)
    for i, v in enumerate(tables.layouts):
        by_layout[i] = v
    was_enabled = gc.isenabled()
    gc.disable()   # millions of new objects would set off repeated full collections
    try:
        for s in range(0, n, BUILD_BLOCK):
            sl = slice(s, s + BUILD_BLOCK)
            pid = ops.prefix[sl]
            lid = ops.layout[sl]
            m = pid.shape[0]
            if ops.hi is None:
                hashes = hex_strings(ops.lo[sl], ops.ndig[sl])
            else:
                hashes = hex_strings(np.concatenate([ops.hi[sl], ops.lo[sl]], axis=1), ops.ndig[sl])
            keys = list(map(new, repeat(CacheEngineKey, m)))
            if (pid == pid[0]).all():
                t = templates[int(pid[0])]
                for k, h in zip(keys, hashes):
                    d = k.__dict__
                    d.update(t)
                    d["chunk_hash"] = h
            else:
                for k, t, h in zip(keys, by_prefix[pid].tolist(), hashes):
                    d = k.__dict__
                    d.update(t)
                    d["chunk_hash"] = h
            if (lid == lid[0]).all():
                v = tables.layouts[int(lid[0])]
                nb, sh, dt, fm = repeat(v.nbytes), repeat(v.shape), repeat(v.dtype), repeat(v.fmt)
            else:
                vs = by_layout[lid].tolist()
                nb, sh = [v.nbytes for v in vs], [v.shape for v in vs]
                dt, fm = [v.dtype for v in vs], [v.fmt for v in vs]
            out.extend(map(DiskEntry, keys, ops.offset[sl].tolist(), nb, ops.phys[sl].tolist(), sh, dt, fm,
                           ops.csum[sl].tolist(), ops.seq[sl].tolist()))
    finally:
        if was_enabled:
            gc.enable()
    return out

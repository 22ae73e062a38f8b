"""Reading the disk index of format version 1 (JSON lines, ``kvcache.index``), for its one-time migration.

Earlier versions kept the index as one JSON object a line, each followed by a
tab and the CRC32 of the JSON (8 hex digits); the first line is a header
``{"magic": "gds_kvcache-index", "version": 1}``. ``IndexLog.load`` reads it
while no binary snapshot exists, and the first snapshot deletes it (the
binary format is described in ``index_codec``). Invariants: this module only
reads; its records become the same :class:`~.index_decode.Ops` that the
binary decoder makes, checked as strictly (an unusable line is skipped and
counted, never raised); a header of another magic or version is refused
(:class:`IndexFormatError`, by :func:`check_legacy_header`, which
``IndexLog`` calls before it uses any file).
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Optional

import numpy as np

from ..errors import GdsKvCacheError, IndexFormatError
from ..key import CacheEngineKey
from ..units import PAGE
from .index_codec import INDEX_VERSION, LEGACY_VERSION, MAX_OFFSET, MAX_PHYS_SIZE, MAX_U64, NARROW, Tables
from .index_decode import Ops

__all__ = ["check_legacy_header", "parse_legacy"]

log = logging.getLogger(__name__)

_LEGACY_MAGIC = "gds_kvcache-index"


def _legacy_decode(line: bytes) -> Optional[dict]:
    payload, sep, crc = line.rstrip(b"\n").rpartition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        rec = json.loads(payload)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def check_legacy_header(path: str, buf: bytes) -> None:
    """Raise unless ``buf`` is empty or a JSON-lines index of version 1."""
    if not buf:
        return
    rec = _legacy_decode(buf.split(b"\n", 1)[0])
    if rec is None or rec.get("magic") != _LEGACY_MAGIC:
        raise IndexFormatError(
            f"index file {path} is neither a gds_kvcache binary index nor its JSON-lines version "
            f"{LEGACY_VERSION} (it starts {bytes(buf[:24])!r}); it is left untouched. Move it away to "
            "start with an empty index")
    if rec.get("version") != LEGACY_VERSION:
        raise IndexFormatError(
            f"index file {path} is JSON-lines format version {rec.get('version')!r}; this library reads "
            f"binary version {INDEX_VERSION} and migrates JSON-lines version {LEGACY_VERSION}. The files "
            "are left untouched")


def parse_legacy(path: str, buf: bytes, tables: Tables) -> tuple[Ops, int]:
    """Operations of a JSON-lines index of version 1 (a one-time migration: a Python loop)."""
    lines = buf.split(b"\n")
    bad = 0
    if lines[-1] == b"":
        lines.pop()
    else:
        bad += 1   # a torn last line
        lines.pop()
    recs = []
    for i, line in enumerate(lines):
        rec = _legacy_decode(line)
        if rec is None:
            bad += 1
            continue
        if i == 0 and rec.get("magic") == _LEGACY_MAGIC:
            continue
        try:
            op = rec.get("op")
            key = CacheEngineKey.from_string(rec["key"])
            seq = int(rec.get("seq", 0))
            if op == "put":
                lay = tables.layout((tuple(int(d) for d in rec["shape"]), str(rec["dtype"]), str(rec["fmt"])))
                nbytes, phys, off, csum = int(rec["n"]), int(rec["phys"]), int(rec["off"]), int(rec["csum"], 16)
                if lay < 0 or nbytes != tables.layouts[lay].nbytes:
                    raise ValueError("unknown layout, or nbytes does not match shape and dtype")
                if not (nbytes <= phys <= MAX_PHYS_SIZE and phys % PAGE == 0 and 0 <= off <= MAX_OFFSET
                        and off % PAGE == 0 and 0 <= seq <= MAX_U64 and 0 <= csum <= MAX_U64):
                    raise ValueError("impossible extent, seq or checksum")
            elif op == "del":
                lay, phys, off, csum = -1, 0, 0, 0
                if not 0 <= seq <= MAX_U64:
                    raise ValueError("impossible seq")
            else:
                raise ValueError(f"unknown op {op!r}")
            g = tables.prefix((key.fmt, key.model_name, key.world_size, key.worker_id))
            if g < 0:
                raise ValueError("key prefix unusable")
            recs.append((op == "put", g, key.chunk_hash, lay, phys, off, seq, csum))
        except (ValueError, KeyError, TypeError, AttributeError, GdsKvCacheError) as e:
            log.warning("JSON index %s line %d unusable (%s); skipped", path, i + 1, e)
            bad += 1
    wide = any(len(r[2]) > NARROW for r in recs)
    ops = Ops(len(recs), wide=wide)
    for i, (is_put, g, h, lay, phys, off, seq, csum) in enumerate(recs):
        raw = int(h, 16).to_bytes(32, "big")
        ops.is_put[i], ops.prefix[i], ops.ndig[i] = is_put, g, len(h)
        ops.lo[i] = np.frombuffer(raw[16:], np.uint8)
        if wide:
            ops.hi[i] = np.frombuffer(raw[:16], np.uint8)
        ops.layout[i], ops.phys[i], ops.offset[i], ops.seq[i], ops.csum[i] = lay, phys, off, seq, csum
    return ops, bad

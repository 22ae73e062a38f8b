"""Crash-safe index of the disk pool: an append-only log of put/delete records.

Each record is one line, ``<json>\\t<crc32 hex>\\n``, written with a single
``write`` on an ``O_APPEND`` descriptor after the chunk's bytes are fully
written, so a chunk becomes visible only once complete. Replay ignores torn
or altered lines (their CRC fails), and when two live entries claim
overlapping pool bytes the newer one wins, since only it can own them.
The log is rewritten as a snapshot (temp file, fsync, rename) at start-up
and whenever dead records pile up.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

from ..key import CacheEngineKey

__all__ = ["DiskEntry", "IndexLog", "INDEX_MAGIC"]

log = logging.getLogger(__name__)

INDEX_MAGIC = "gds_kvcache-index"
INDEX_VERSION = 1


@dataclass
class DiskEntry:
    """Where one chunk lives in the pool file, and what it is."""

    key: CacheEngineKey
    offset: int
    nbytes: int
    phys_size: int
    shape: tuple
    dtype: str
    fmt: str
    checksum: int
    seq: int = 0
    readers: int = 0
    doomed: bool = False

    def record(self) -> dict:
        return {"op": "put", "key": self.key.to_string(), "off": self.offset, "n": self.nbytes,
                "phys": self.phys_size, "shape": list(self.shape), "dtype": self.dtype,
                "fmt": self.fmt, "csum": format(self.checksum, "016x"), "seq": self.seq}

    @classmethod
    def from_record(cls, r: dict) -> "DiskEntry":
        shape = tuple(int(d) for d in r["shape"])
        e = cls(CacheEngineKey.from_string(r["key"]), int(r["off"]), int(r["n"]), int(r["phys"]), shape,
                str(r["dtype"]), str(r["fmt"]), int(r["csum"], 16), int(r["seq"]))
        if e.offset < 0 or e.nbytes <= 0 or e.phys_size < e.nbytes or any(d < 0 for d in shape):
            raise ValueError("impossible extent or shape")
        return e


def _encode(rec: dict) -> bytes:
    payload = json.dumps(rec, separators=(",", ":")).encode()
    return payload + b"\t" + format(zlib.crc32(payload), "08x").encode() + b"\n"


def _decode(line: bytes) -> Optional[dict]:
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


class IndexLog:
    """The on-disk index of one pool file.

    Parameters
    ----------
    path
        The log file.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None
        self.records = 0
        self.bytes = 0
        self.seq = 0

    def replay(self) -> tuple[list[DiskEntry], int]:
        """Live entries in log order, and how many bad lines were skipped."""
        live: dict[CacheEngineKey, DiskEntry] = {}
        bad = 0
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            bad += 1  # torn last record from a crash mid-append
            lines.pop()
        for i, line in enumerate(lines):
            rec = _decode(line + b"\n")
            if rec is None:
                bad += 1
                continue
            try:
                op = rec.get("op")
                if i == 0 and rec.get("magic") == INDEX_MAGIC:
                    if rec.get("version") != INDEX_VERSION:
                        raise ValueError(f"index version {rec.get('version')} (this library reads {INDEX_VERSION})")
                    continue
                if op == "put":
                    e = DiskEntry.from_record(rec)
                    live[e.key] = e
                    self.seq = max(self.seq, e.seq)
                elif op == "del":
                    live.pop(CacheEngineKey.from_string(rec["key"]), None)
                    self.seq = max(self.seq, int(rec.get("seq", 0)))
                else:
                    bad += 1
            except (ValueError, KeyError, TypeError) as e:
                log.warning("index %s line %d unusable (%s); ignoring it", self.path, i + 1, e)
                bad += 1
        return sorted(live.values(), key=lambda e: e.seq), bad

    def rewrite(self, entries: Iterable[DiskEntry]) -> None:
        """Replace the log by a snapshot of ``entries`` atomically, then reopen it for appends."""
        tmp = self.path + ".tmp"
        n = 0
        with open(tmp, "wb") as f:
            f.write(_encode({"magic": INDEX_MAGIC, "version": INDEX_VERSION}))
            for e in entries:
                f.write(_encode(e.record()))
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.records = n
        self.bytes = os.fstat(self._fd).st_size

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _append(self, rec: dict) -> None:
        line = _encode(rec)
        assert self._fd is not None, "index log not open"
        os.write(self._fd, line)
        self.records += 1
        self.bytes += len(line)

    def append_put(self, e: DiskEntry) -> None:
        self._append(e.record())

    def append_del(self, key: CacheEngineKey) -> None:
        self._append({"op": "del", "key": key.to_string(), "seq": self.next_seq()})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""The disk index's files and their lifecycle: ``IndexLog``, a snapshot plus an append-only log.

The file format is described in ``index_codec`` (only there); this module
decides which files are read, written, renamed and fsynced, and when,
encoding through ``index_encode`` and decoding through ``index_decode`` (and
``index_legacy``). Invariants: a crash leaves the old state or the new one
(see :class:`IndexLog`'s notes); ``load`` and a refusal (``IndexFormatError``)
change no file.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from ..errors import ClosedError
from ..key import CacheEngineKey
from .entry import DiskEntry, IndexEntryError
from .index_codec import (INDEX_VERSION, KIND_LOG, KIND_SNAP, LEGACY_NAME, LOG_NAME, MAX_OFFSET, SLOT, SNAP_NAME,
                          TABLE_ALLOWANCE, Layout, Tables, header_check, header_slot, mix, parse_header, seal)
from .index_columns import EntryColumns, build_entries, live_ops
from .index_decode import Ops, parse_slots
from .index_files import fsync_dir as _fsync_dir  # a module global: tests/test_index_log.py steps it
from .index_files import read_bytes, read_mapped, write_file
from .index_encode import FileTables, check_batch, encode_batch, encode_snapshot
from .index_legacy import check_legacy_header, parse_legacy

# DiskEntry, IndexEntryError and the format constants are re-exported: code
# and tests import them from here.
__all__ = ["IndexLog", "DiskEntry", "EntryColumns", "IndexEntryError", "INDEX_VERSION", "SLOT", "SNAP_NAME",
           "LOG_NAME", "LEGACY_NAME", "MAX_OFFSET", "TABLE_ALLOWANCE"]

log = logging.getLogger(__name__)

# Reached through this module by tests/test_index_log.py: it reseals edited files and,
# replacing _mix (the key fingerprint load hands to live_ops), forces collisions.
_seal, _header_check, _mix = seal, header_check, mix


class IndexLog:
    """The on-disk index of one cache directory: a snapshot and a log of 56-byte records.

    Parameters
    ----------
    directory
        The cache directory; the files are ``kvcache.index*`` in it.

    Notes
    -----
    Call :meth:`load` once first (or :meth:`snapshot`); :meth:`append` and
    :meth:`next_seq` load lazily otherwise, which costs a full read.

    Crash safety: :meth:`append` writes a batch with one ``os.write`` on an
    ``O_APPEND`` descriptor, so a crash loses at most part of that batch;
    each slot's check rejects torn or altered slots, which :meth:`load`
    skips and counts. :meth:`snapshot` writes the new snapshot to a
    temporary file, fsyncs it, renames it into place and fsyncs the
    directory, and only then starts a new log of the new generation: an old
    log still on disk after a crash no longer matches and is ignored, so a
    crash leaves the old state or the new one, never a mix.

    Appends are not fsynced: a power cut may lose the last batches (those
    chunks read as absent), never half-apply them. A flipped bit in a
    delete loses that delete; in a table entry, every record that uses it.
    Both count as unusable records.

    Size: 56 bytes per chunk (112 with a chunk_hash of over 32 hex digits)
    plus one header slot per file and the tables; no cap. :meth:`load_columns`
    and a snapshot of ``EntryColumns`` make no Python object per chunk; of
    :meth:`load`, making the objects is most of the time
    (``scripts/bench_index.py`` splits it), with the cyclic garbage
    collector paused while they are made.

    The caller serialises all calls (its own lock); this class takes none.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.snap_path = os.path.join(directory, SNAP_NAME)
        self.log_path = os.path.join(directory, LOG_NAME)
        self.legacy_path = os.path.join(directory, LEGACY_NAME)
        self._fd: Optional[int] = None
        self._closed = False
        self._loaded = False
        self._must_reset = False     # load found a corrupt header and returned nothing: next write starts over
        self._gen = 0                # generation the log must carry (0: no binary snapshot)
        self._log_usable = False     # the log on disk has that generation and may be appended to
        self._log_clean = 1 << 62    # its length without a torn tail (as load found it)
        self._seq = 0
        self._file_tables = FileTables()          # table ids of the current log
        self._table_slots: dict[tuple, int] = {}  # every prefix/layout seen -> slots its entry takes
        self._valid_layouts: dict[tuple, Layout] = {}
        self._snap_records = self._log_records = 0
        self._snap_bytes = self._log_bytes = self._legacy_bytes = 0

    # -- sizes ------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes the index files take now (snapshot + log, and a JSON index not yet migrated)."""
        return self._snap_bytes + self._log_bytes + self._legacy_bytes

    @property
    def records(self) -> int:
        """Put and delete records in the snapshot and the log, live and dead (unusable ones too)."""
        return self._snap_records + self._log_records

    @property
    def table_bytes(self) -> int:
        """Bytes the table entries of every key prefix and layout seen so far take in one file."""
        return SLOT * sum(self._table_slots.values())

    @staticmethod
    def size_of(entries_count: int, wide: int = 0, table_bytes: int = TABLE_ALLOWANCE) -> int:
        """Upper bound on the bytes of a snapshot of ``entries_count`` entries, ``wide`` of them
        with a chunk_hash of over 32 hex digits: 56 bytes an entry, 112 a wide one, one header
        slot, plus ``table_bytes`` (:attr:`table_bytes` bounds what this log's entries need)."""
        return SLOT * (1 + entries_count + wide) + table_bytes

    # -- reading --------------------------------------------------------------------------
    def load(self) -> tuple[list[DiskEntry], int]:
        """Live entries sorted by ``seq``, and the number of unusable records skipped.

        :meth:`load_columns` as ``DiskEntry`` objects (what a tool or test
        reads; the disk index keeps the columns).
        """
        cols, bad = self.load_columns()
        return self._build(cols.ops, cols.tables), bad

    def load_columns(self) -> tuple[EntryColumns, int]:
        """Live entries sorted by ``seq``, as columns, and the number of unusable records skipped.

        :meth:`load_ops`, merged (``index_columns.live_ops``).
        """
        ops, tables, bad = self.load_ops()
        return EntryColumns(live_ops(ops, _mix), tables), bad

    def load_ops(self) -> tuple[Ops, Tables, int]:
        """Every usable put and delete of the files in file order (snapshot, then log), the
        tables their ids point into, and the number of unusable records skipped.

        Raises
        ------
        IndexFormatError
            An index file has a foreign magic or a newer/unknown version; no
            file is changed.

        Notes
        -----
        Reads the files in full and never writes. Of a key's records the
        latest in the files wins (see ``index_columns.merge_order``): a put
        after a delete of the same key is live, a delete after a put removes
        it. Unusable: torn or altered slots, and intact records naming an
        unknown dtype or fmt, a missing table entry or an impossible value.
        """
        if self._closed:
            raise ClosedError("index log is closed")
        snap = read_mapped(self.snap_path)
        logb = read_mapped(self.log_path)
        legacy = read_bytes(self.legacy_path) if snap is None else None
        # Every file is checked before any is used, so a refusal changes nothing.
        snap_h = parse_header(self.snap_path, snap, KIND_SNAP) if snap is not None else None
        log_h = parse_header(self.log_path, logb, KIND_LOG) if logb else None
        if legacy is not None:
            check_legacy_header(self.legacy_path, legacy)

        self._reset_state()
        self._snap_bytes = len(snap) if snap is not None else 0
        self._log_bytes = len(logb) if logb is not None else 0
        if legacy is not None:
            self._legacy_bytes = len(legacy)
        else:
            self._legacy_bytes = os.path.getsize(self.legacy_path) if os.path.exists(self.legacy_path) else 0
        self._loaded = True
        if (snap_h is not None and not snap_h.ok) or (log_h is not None and not log_h.ok):
            # Without a trusted generation the log cannot be paired with the
            # snapshot, and either one alone may resurrect deleted keys.
            lost = max(1, (self._snap_bytes + self._log_bytes) // SLOT)
            log.warning("index %s: a snapshot or log header is corrupt; starting with an empty index "
                        "(%d slot(s) dropped)", self.directory, lost)
            self._must_reset = True
            return Ops(), Tables(), lost

        tables = Tables()
        parts: list[Ops] = []
        bad = 0
        self._gen = snap_h.gen if snap_h is not None else 0
        if snap is not None:
            ops, b, _ = parse_slots(snap, tables)
            parts.append(ops)
            bad += b
            self._snap_records = len(ops) + b
        elif legacy:
            ops, b = parse_legacy(self.legacy_path, legacy, tables)
            parts.append(ops)
            bad += b
            self._snap_records = len(ops) + b
        if log_h is not None and log_h.gen == self._gen:
            ops, b, local = parse_slots(logb, tables)
            parts.append(ops)
            bad += b
            self._log_records = len(ops) + b
            self._log_usable = True
            prefix_ids, layout_ids, next_prefix, next_layout, self._log_clean = local
            self._file_tables = FileTables(prefix_ids, layout_ids, next_prefix, next_layout)
        elif logb is not None:
            log.info("index %s: the log (generation %s) is not the snapshot's (%s): a snapshot "
                     "interrupted after its rename; log ignored", self.directory,
                     log_h.gen if log_h else None, self._gen)
        tables.remember(self._table_slots, self._valid_layouts)
        ops = Ops.concat(parts)
        if len(ops):
            self._seq = max(self._seq, int(ops.seq.max()))
        return ops, tables, bad

    def _reset_state(self) -> None:
        self.close_fd()
        self._gen = 0
        self._must_reset = False
        self._log_usable = False
        self._file_tables = FileTables()
        self._snap_records = self._log_records = 0

    # The object-building step of load, a class attribute so that
    # scripts/bench_index.py can time it apart by wrapping it.
    _build = staticmethod(build_entries)

    def _ensure_loaded(self) -> None:
        if self._closed:
            raise ClosedError("index log is closed")
        if not self._loaded:
            self.load_columns()

    # -- writing -------------------------------------------------------------------------------
    def next_seq(self) -> int:
        """Reserve and return the next sequence number (above every one recorded)."""
        self._ensure_loaded()
        self._seq += 1
        return self._seq

    def append(self, puts: Sequence[DiskEntry] = (), dels: Sequence[CacheEngineKey] = ()) -> None:
        """Record ``puts`` then ``dels`` with one ``os.write``, each with a fresh ``seq``.

        Raises
        ------
        IndexEntryError
            An entry has an impossible extent, shape, dtype or fmt; nothing is written.
        OSError
            The write failed; the log is cut back to its previous size and
            nothing is recorded.

        Notes
        -----
        Sets ``e.seq`` of every put once the write is done. Not fsynced (see
        the class notes). New key prefixes and layouts add a table entry
        (a slot or a few) in front of the records, in the same write.
        """
        self._ensure_loaded()
        if not puts and not dels:
            return
        lays = check_batch(puts, dels, self._valid_layouts)
        if self._must_reset:
            self.snapshot([])
        self._open_log()
        saved = self._file_tables.copy()
        buf, seq = encode_batch(self._file_tables, puts, lays, dels, self._seq, self._table_slots)
        before = self._log_bytes
        try:
            mv = memoryview(buf)
            w = os.write(self._fd, mv)
            while w < len(mv):      # a short write (rare for files): finish it, slots stay whole
                mv = mv[w:]
                w = os.write(self._fd, mv)
        except BaseException:
            self._file_tables = saved
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                self.close_fd()     # the next append reopens it and cuts it back to whole slots
                self._log_clean = before
            raise
        for i, e in enumerate(puts):
            e.seq = self._seq + 1 + i
        self._seq = seq
        self._log_bytes += len(buf)
        self._log_records += len(puts) + len(dels)

    def _open_log(self) -> None:
        """Make the log on disk current and open it for appends."""
        if self._fd is not None:
            return
        if self._log_usable:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            size = os.fstat(fd).st_size
            clean = min(self._log_clean, SLOT + (size - SLOT) // SLOT * SLOT)
            if size >= SLOT:
                if clean != size:
                    # Cut off a torn tail: part of a slot would misalign every later
                    # slot, and a record cut short would be read with the next one.
                    os.ftruncate(fd, clean)
                self._fd = fd
                self._log_bytes = clean
                return
            os.close(fd)
        self._new_log()

    def _new_log(self) -> None:
        """Start an empty log of the current generation (temp file, fsync, rename)."""
        self.close_fd()
        tmp = self.log_path + ".tmp"
        n = write_file(tmp, [header_slot(KIND_LOG, self._gen)])
        os.replace(tmp, self.log_path)
        _fsync_dir(self.directory)
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        self._log_usable = True
        self._log_clean = 1 << 62
        self._log_bytes = n
        self._log_records = 0
        self._file_tables = FileTables()

    def snapshot(self, entries) -> None:
        """Make the index equal to exactly ``entries`` (``DiskEntry`` objects or an ``EntryColumns``),
        atomically and crash-safely.

        Raises
        ------
        IndexEntryError
            An entry cannot be recorded; nothing on disk changes.
        IndexFormatError
            Called before :meth:`load` on a directory whose index is foreign
            or newer; nothing on disk changes.

        Notes
        -----
        Order: new snapshot to ``.tmp``, fsync, rename, fsync the directory;
        then a fresh log of the new generation (temp file and rename too);
        then the JSON index of earlier versions, if any, is deleted. Entries
        are written in ``seq`` order and keep their ``seq``. Of objects, costs
        about as much as :meth:`load` (each entry's fields are read in
        Python); of columns, a few NumPy passes.
        """
        if self._closed:
            raise ClosedError("index log is closed")
        if not self._loaded:
            self._check_headers()
        entries = entries if isinstance(entries, (list, EntryColumns)) else list(entries)
        blocks, top = encode_snapshot(entries, self._valid_layouts, self._table_slots)
        gen = 0
        while gen == 0:
            gen = int.from_bytes(os.urandom(8), "little")
        tmp = self.snap_path + ".tmp"
        size = write_file(tmp, [header_slot(KIND_SNAP, gen)] + blocks)
        os.replace(tmp, self.snap_path)
        _fsync_dir(self.directory)
        # The new snapshot is durable: from here the old log no longer matches and is ignored.
        self._gen = gen
        self._snap_bytes = size
        self._snap_records = len(entries)
        self._must_reset = False
        self._new_log()
        if os.path.exists(self.legacy_path):
            os.unlink(self.legacy_path)
            _fsync_dir(self.directory)
        self._legacy_bytes = 0
        self._seq = max(self._seq, top)
        self._loaded = True

    def _check_headers(self) -> None:
        """Refuse (IndexFormatError) to replace an index this library does not read."""
        for path, kind in ((self.snap_path, KIND_SNAP), (self.log_path, KIND_LOG)):
            try:
                with open(path, "rb") as f:
                    head = f.read(SLOT)
            except FileNotFoundError:
                continue
            if head:
                parse_header(path, head, kind)
        if not os.path.exists(self.snap_path):
            legacy = read_bytes(self.legacy_path)
            if legacy is not None:
                check_legacy_header(self.legacy_path, legacy)

    # -- closing --------------------------------------------------------------------------------
    def close_fd(self) -> None:
        """Close the append descriptor (reopened by the next append)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the log; later calls raise ``ClosedError``."""
        self.close_fd()
        self._closed = True

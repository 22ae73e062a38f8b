"""``RedisIndex``: the cluster-wide chunk index of shared mode, kept in one Redis server.

Every operation that must be atomic against another process is one Lua
script (in ``lua_scripts``), so a batch is one round trip and no
interleaving can split its checks from its effects. The schema, under a
namespace ``ns``:

``ns:e:<key>``        hash: writer ``w``, generation ``g``, logical offset ``o``,
                      ``n`` bytes, ``p`` phys size, shape ``sh``, ``dt``, ``fm``, checksum ``cs``,
                      and ``b``, the writer run (boot) that published it
``ns:c:<key>``        string, ``SET NX PX``: the writer that claimed the put of ``key``
``ns:l:<w>:<g>``      sorted set: reader lease tokens scored by expiry (Redis ms)
``ns:w:<w>``          hash: pool layout of writer ``w`` (``dir``, ``stripes``, ``stripe_bytes``,
                      ``unit``, ``boot``)
``ns:k:<w>``          set: keys writer ``w`` has published (for its purge at start)
``ns:epoch``          token set by the first writer after the server started empty
``ns:rebuild``        counter: any process bumps it to ask every writer to re-publish
``ns:s:<w>``          counter: bumped by every publish and retract of writer ``w`` (an older
                      state of Redis shows a lower value than the writer last saw)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import StorageUnavailableError
from ..key import CacheEngineKey
from ..storage.disk_index import DiskEntry
from .lua_scripts import ACQUIRE, CLAIM, EXISTS, PREFIX, PUBLISH, PURGE, RELEASE, RETRACT, STATUS, UNCLAIM
from .redis_gate import Gate, gated

__all__ = ["RedisIndex", "Published", "connect", "redis_errors"]

log = logging.getLogger(__name__)


@dataclass
class Published:
    """One entry as Redis holds it (what a reader needs to find and check the bytes)."""

    key: str
    writer: str
    generation: str
    offset: int
    nbytes: int
    phys_size: int
    shape: tuple
    dtype: str
    fmt: str
    checksum: int
    boot: str = ""          # the writer run that published it
    writer_boot: str = ""   # the writer's run now (as a reader found it): a mismatch is a stale entry

    @classmethod
    def of_entry(cls, e, writer: str, boot: str) -> "Published":
        """The record of writer ``writer``'s index entry ``e`` (a ``DiskEntry``), run ``boot``."""
        return cls(e.key.to_string(), writer, str(e.seq), e.offset, e.nbytes, e.phys_size, tuple(e.shape),
                   e.dtype, e.fmt, e.checksum, boot)

    def to_entry(self, key: Optional[CacheEngineKey] = None) -> DiskEntry:
        """The chunk descriptor of this record (``seq`` is its generation); ``key`` is the key it was
        looked up by (saves parsing ``self.key``, which names it). Raises ``KeyFormatError`` or
        ``ValueError`` for a record whose key or generation is not well formed."""
        return DiskEntry(key if key is not None else CacheEngineKey.from_string(self.key), self.offset,
                         self.nbytes, self.phys_size, tuple(self.shape), self.dtype, self.fmt, self.checksum,
                         int(self.generation))


@dataclass
class Status:
    """What ``RedisIndex.status`` read: epoch token (None: absent), rebuild counter, state went back."""

    epoch: Optional[str]
    rebuild: int
    went_back: bool


def redis_errors() -> tuple:
    """The exceptions of an unreachable, restarting or failing Redis (a miss, never a crash)."""
    import redis
    return (redis.RedisError, OSError)


def connect(url: str, timeout: float = 2.0):
    """A ``redis.Redis`` client for ``url`` (``redis://host:port/db`` or ``unix:///path``).

    Raises
    ------
    StorageUnavailableError
        The ``redis`` package is not installed.
    """
    try:
        import redis
    except ImportError:
        raise StorageUnavailableError(
            "lookup_server_url is set but the 'redis' package is not installed; install it "
            "(pip install redis) or leave lookup_server_url unset for local mode") from None
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=True)


class RedisIndex:
    """The shared index: publish, retract, lease, claim and look up chunks in one Redis.

    Parameters
    ----------
    url
        The Redis server (``lookup_server_url``).
    namespace
        Prefix of every Redis key, so several caches can share one server.
    lease_ttl
        Seconds a reader's lease protects an extent; a reader must finish its
        read within it or the read counts as a miss.
    claim_ttl
        Seconds a put claim (``SET NX``) keeps other writers off a key.
    socket_timeout
        Seconds the client waits for Redis (``redis_socket_timeout``).
    backoff
        Seconds Redis is treated as down after a timeout before a background
        probe asks again (``redis_backoff``); meanwhile every call fails at once.

    Notes
    -----
    Every method is one round trip whatever the batch size; errors of the
    ``redis`` package (server down or restarting) propagate as they are, and
    the shared backend turns them into misses. Run Redis without persistence
    (``--save '' --appendonly no``): after a restart the writers re-publish
    from their own index logs, which are the truth.
    """

    def __init__(self, url: str, namespace: str = "gdskv", lease_ttl: float = 5.0, claim_ttl: float = 30.0,
                 socket_timeout: float = 2.0, backoff: float = 5.0):
        self.url = url
        self.ns = namespace
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.claim_ms = max(1, int(claim_ttl * 1000))
        self.client = connect(url, socket_timeout)
        self._gate = Gate(self.client, backoff)
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("publish", PUBLISH), ("retract", RETRACT), ("unclaim", UNCLAIM), ("acquire", ACQUIRE),
            ("prefix", PREFIX), ("claim", CLAIM), ("purge", PURGE), ("exists", EXISTS), ("release", RELEASE), ("status", STATUS))}
        self._tokens = 0
        self._seq: dict[str, int] = {}        # writer -> its state counter as this client last wrote it

    def _run(self, name: str, args: Sequence) -> object:
        return self._scripts[name](args=[self.ns, *args])

    # -- writers ------------------------------------------------------------------
    @gated
    def register(self, writer: str, layout: dict) -> None:
        """Record ``writer``'s pool layout (readers map offsets to its files with it)."""
        self._repair(f"{self.ns}:writers", "set")
        p = self.client.pipeline(transaction=True)
        p.delete(f"{self.ns}:w:{writer}")
        p.hset(f"{self.ns}:w:{writer}", mapping={k: str(v) for k, v in layout.items()})
        p.sadd(f"{self.ns}:writers", writer)
        p.execute()

    @gated
    def layout(self, writer: str) -> dict:
        """``writer``'s layout hash as Redis holds it (empty if absent or not a hash); its values
        are validated by the reader (``PoolLayout.from_fields``)."""
        k = f"{self.ns}:w:{writer}"
        if self.client.type(k) != "hash":
            return {}
        return self.client.hgetall(k)

    @gated
    def purge(self, writer: str) -> int:
        """Delete every entry ``writer`` published before; returns how many."""
        return int(self._run("purge", [writer]))

    @gated
    def publish(self, writer: str, entries: Sequence[Published]) -> list[str]:
        """Make ``entries`` visible; returns the keys another writer had published first."""
        args: list = [writer]
        for e in entries:
            args += [e.key, e.generation, e.offset, e.nbytes, e.phys_size, ",".join(map(str, e.shape)),
                     e.dtype, e.fmt, str(e.checksum), e.boot]
        if not entries:
            return []
        seq, dups = self._run("publish", args)
        self._saw(writer, seq)
        return list(dups)

    @gated
    def retract(self, writer: str, epoch: Optional[str], items: Sequence[tuple[str, str]],
                unleased: bool = False) -> tuple[bool, list[int]]:
        """Delete ``(key, generation)`` entries of ``writer`` (idempotent).

        Returns whether the server's epoch is still ``epoch`` (False: it
        restarted and forgot its leases, so no ms figure can be trusted) and,
        per item, the ms its longest live lease has left (0: free now). With
        ``unleased``, leased entries are left published, and nothing is
        retracted unless the epoch is still ``epoch``.
        """
        args: list = [writer, epoch or "", "1" if unleased else "0"]
        for k, g in items:
            args += [k, g]
        out = [int(x) for x in self._run("retract", args)]
        if len(out) == 1:          # refused (the epoch changed): nothing was retracted
            return False, [1] * len(items)
        ok, ms = bool(out[0]), out[2:]
        self._saw(writer, out[1])
        return ok, (ms if ok or not unleased else [1] * len(items))

    def _saw(self, writer: str, seq) -> None:
        self._seq[writer] = max(self._seq.get(writer, 0), int(seq))

    @gated
    def status(self, writer: str) -> "Status":
        """The epoch, the rebuild counter and whether ``writer``'s state went back, in one round trip.

        The state went back when Redis holds an older state of ``writer``'s
        entries than this client last wrote (restored from a snapshot, a
        lagging replica after failover): every write of the writer bumps its
        counter ``ns:s:<writer>``, so a counter below the last one seen went back.
        """
        # The counter last seen before asking: a write by another thread meanwhile may raise
        # what this client saw past the answer, which is then not an older state.
        seen = self._seq.get(writer)
        epoch, rebuild, seq = self._run("status", [writer])
        try:
            rebuild = int(rebuild) if rebuild else 0
        except ValueError:
            rebuild = self.rebuild_requests.__wrapped__(self)     # repairs it
        back = False
        if seen is not None:
            try:
                back = int(seq) < seen
            except (TypeError, ValueError):
                back = True
        return Status(epoch or None, rebuild, back)

    @gated
    def resync(self, writer: str) -> None:
        """Set ``writer``'s counter back to the last one seen (after re-publishing over an old state)."""
        if writer in self._seq:
            self.client.set(f"{self.ns}:s:{writer}", self._seq[writer])

    @gated
    def unclaim(self, writer: str, keys: Sequence[str]) -> None:
        """Drop ``writer``'s put claims on ``keys`` (its puts failed or were not made)."""
        if keys:
            self._run("unclaim", [writer, *keys])

    @gated
    def claim(self, writer: str, keys: Sequence[str]) -> list[bool]:
        """Per key: True if ``writer`` may write it (claimed, or claimed by it before), False if it
        is published already or another writer claimed it."""
        if not keys:
            return []
        return [bool(x) for x in self._run("claim", [writer, self.claim_ms, *keys])]

    # -- readers -------------------------------------------------------------------
    def new_token(self, reader: str) -> str:
        self._tokens += 1
        return f"{reader}:{self._tokens}:{uuid.uuid4().hex[:8]}"

    @gated
    def acquire(self, token: str, keys: Sequence[str]) -> tuple[list[Optional[Published]], list[str]]:
        """Lease and return the entry of each key (None where absent or malformed), and the
        ``writer:generation`` pairs leased (to ``release``, malformed entries' too)."""
        if not keys:
            return [], []
        out: list[Optional[Published]] = []
        leased: list[str] = []
        for k, v in zip(keys, self._run("acquire", [token, self.lease_ms, *keys])):
            if not v:
                out.append(None)
                continue
            f = v.split("\t")
            leased.append(f"{f[0]}:{f[1]}")
            try:
                w, g, o, n, p, sh, dt, fm, cs, boot, now_boot = f
                out.append(Published(k, w, g, int(o), int(n), int(p),
                                     tuple(int(d) for d in sh.split(",") if d), dt, fm, int(cs), boot, now_boot))
            except ValueError:
                log.warning("ignoring malformed Redis entry of %s: %r", k, v[:200])
                out.append(None)
        return out, leased

    @gated
    def release(self, token: str, leased: Sequence[str]) -> None:
        """End ``token``'s leases on the ``writer:generation`` pairs ``acquire`` returned (one round trip)."""
        if leased:
            self._run("release", [token, *set(leased)])

    @staticmethod
    def _chunk_args(chunks: Sequence[Sequence[str]]) -> list:
        return [len(chunks), *[len(c) for c in chunks], *[k for c in chunks for k in c]]

    @gated
    def prefix(self, chunks: Sequence[Sequence[str]]) -> int:
        """How many chunks, from the first, have every one of their keys published (one snapshot)."""
        if not chunks:
            return 0
        return int(self._run("prefix", self._chunk_args(chunks)))

    @gated
    def exists(self, chunks: Sequence[Sequence[str]]) -> list[bool]:
        """Per chunk, whether every one of its keys is published (one snapshot)."""
        if not chunks:
            return []
        return [bool(x) for x in self._run("exists", self._chunk_args(chunks))]

    @gated
    def lease_left_ms(self, writer: str) -> int:
        """Ms the longest live lease on any of ``writer``'s extents has left (0: none).

        A scan of ``writer``'s lease sets (each lives ``lease_ttl`` + 1 s past its
        last lease): for a writer's start, not the serving path.
        """
        best = 0
        names = list(self.client.scan_iter(f"{self.ns}:l:{writer}:*", count=10000))
        for i in range(0, len(names), 1000):
            p = self.client.pipeline(transaction=False)
            p.time()
            for n in names[i:i + 1000]:
                p.zrange(n, -1, -1, withscores=True)
            sec, usec = (res := p.execute(raise_on_error=False))[0]
            now = sec * 1000 + usec // 1000
            for n, last in zip(names[i:i + 1000], res[1:]):
                if isinstance(last, Exception):
                    # Not a lease set (garbage someone wrote): it holds no lease; it goes.
                    log.warning("Redis key %s is not a lease set: deleted", n)
                    self.client.delete(n)
                elif last:
                    best = max(best, int(last[0][1]) - now)
        return best

    @gated
    def count(self) -> int:
        """Entries published (a scan: for tests and tools, not the serving path)."""
        return sum(1 for _ in self.client.scan_iter(f"{self.ns}:e:*", count=1000))

    # -- restart detection -------------------------------------------------------------
    @gated
    def epoch(self) -> Optional[str]:
        """The server's epoch token (None: absent, or not a string: treated as a restart)."""
        k = f"{self.ns}:epoch"
        return self.client.get(k) if self.client.type(k) == "string" else None

    @gated
    def set_epoch(self) -> str:
        """The server's epoch token, set now if absent (the server started empty)."""
        self._repair(f"{self.ns}:epoch", "string")
        self.client.set(f"{self.ns}:epoch", uuid.uuid4().hex, nx=True)
        return self.client.get(f"{self.ns}:epoch")

    @gated
    def rebuild_requests(self) -> int:
        """The rebuild counter; a value that is no counter is reset (every writer re-publishes once)."""
        k = f"{self.ns}:rebuild"
        if self.client.type(k) == "string":
            raw = self.client.get(k)
            try:
                return int(raw)
            except (TypeError, ValueError):
                log.warning("Redis key %s holds %r, not a counter: reset", k, str(raw)[:40])
        elif self.client.type(k) == "none":
            return 0
        else:
            log.warning("Redis key %s is a %s, not a counter: reset", k, self.client.type(k))
        self.client.delete(k)
        return 0

    def _repair(self, key: str, want: str) -> None:
        """Delete ``key`` if it holds a value of another type than ``want`` (garbage someone wrote)."""
        t = self.client.type(key)
        if t not in ("none", want):
            log.warning("Redis key %s is a %s, not a %s: deleted", key, t, want)
            self.client.delete(key)

    @gated
    def request_rebuild(self) -> None:
        """Ask every writer to re-publish its chunks from its index (seen within a tick)."""
        self.rebuild_requests.__wrapped__(self)   # repairs a value that is no counter
        self.client.incr(f"{self.ns}:rebuild")

    @property
    def down(self) -> bool:
        """Whether Redis is treated as down now (a timeout, and no probe answered since)."""
        return self._gate.down_since is not None

    @property
    def timeouts(self) -> int:
        """How often a timeout put Redis down."""
        return self._gate.trips

    def close(self) -> None:
        self.client.close()

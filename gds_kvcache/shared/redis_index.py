"""``RedisIndex``: the cluster-wide chunk index of shared mode, kept in one Redis server.

Every operation that must be atomic against another process is one Lua
script, so a batch is one round trip and no interleaving can split its
checks from its effects. The schema, under a namespace ``ns``:

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
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import StorageUnavailableError

__all__ = ["RedisIndex", "Published", "connect", "redis_errors"]

log = logging.getLogger(__name__)

_PUBLISH = """
local ns, w = ARGV[1], ARGV[2]
local dups = {}
for i = 3, #ARGV, 10 do
  local k = ARGV[i]
  local e = ns .. ':e:' .. k
  local cur = redis.call('HGET', e, 'w')
  if cur and cur ~= w then
    dups[#dups + 1] = k
  else
    redis.call('HSET', e, 'w', w, 'g', ARGV[i+1], 'o', ARGV[i+2], 'n', ARGV[i+3], 'p', ARGV[i+4],
               'sh', ARGV[i+5], 'dt', ARGV[i+6], 'fm', ARGV[i+7], 'cs', ARGV[i+8], 'b', ARGV[i+9])
    redis.call('SADD', ns .. ':k:' .. w, k)
  end
  redis.call('DEL', ns .. ':c:' .. k)
end
return dups
"""

# Retract (key, generation) entries of writer w and say, per item, how many ms the longest
# live lease on (w, g) has left: the owner reuses the extent only after. The first reply is 1
# if the server's epoch is still the caller's (0: it restarted, and forgot every lease). With
# ``unleased`` an entry that has a live lease stays (an eviction moves on to another victim),
# and nothing is retracted when the epoch changed.
_RETRACT = """
local ns, w, epoch, unleased = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local ok = 0
if redis.call('GET', ns .. ':epoch') == epoch then ok = 1 end
if unleased and ok == 0 then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {ok}
for i = 5, #ARGV, 2 do
  local k, g = ARGV[i], ARGV[i+1]
  local l = ns .. ':l:' .. w .. ':' .. g
  redis.call('ZREMRANGEBYSCORE', l, '-inf', now)
  local last = redis.call('ZRANGE', l, -1, -1, 'WITHSCORES')
  local ms = 0
  if last[2] then ms = tonumber(last[2]) - now end
  if not (unleased and ms > 0) then
    local e = ns .. ':e:' .. k
    local cur = redis.call('HMGET', e, 'w', 'g')
    if cur[1] == w and cur[2] == g then
      redis.call('DEL', e)
      redis.call('SREM', ns .. ':k:' .. w, k)
    end
  end
  out[#out + 1] = ms
end
return out
"""

# Drop writer w's claims on the listed keys (its puts of them failed or were skipped).
_UNCLAIM = """
local ns, w = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local c = ns .. ':c:' .. ARGV[i]
  if redis.call('GET', c) == w then redis.call('DEL', c) end
end
return 0
"""

# Lease every listed entry that exists (one ZADD per entry) and return its fields as one
# tab-joined string per entry: a reply of one bulk string per chunk parses several times faster
# than one per field. Per writer, its boot and its newest-lease marker are touched once.
_ACQUIRE = """
local ns, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boots = {}
local out = {}
for i = 4, #ARGV do
  local e = ns .. ':e:' .. ARGV[i]
  local v = redis.call('HMGET', e, 'w', 'g', 'o', 'n', 'p', 'sh', 'dt', 'fm', 'cs', 'b')
  local wb = nil
  if v[1] then
    wb = boots[v[1]]
    if not wb then
      wb = redis.call('HGET', ns .. ':w:' .. v[1], 'boot') or ''
      boots[v[1]] = wb
    end
  end
  -- An entry of an earlier run of its writer (which may be reusing that extent now) is not leased.
  if v[1] and v[10] and v[10] == wb then
    local l = ns .. ':l:' .. v[1] .. ':' .. v[2]
    redis.call('ZADD', l, now + ttl, token)
    redis.call('PEXPIRE', l, ttl + 1000)
    v[11] = wb
    out[#out + 1] = table.concat(v, '\t')
  else
    out[#out + 1] = false
  end
end
return out
"""

# End token's leases on the listed (writer, generation) pairs.
_RELEASE = """
local ns, token = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  redis.call('ZREM', ns .. ':l:' .. ARGV[i], token)
end
return 0
"""

# Hit prefix over chunks; chunk j is ARGV[3 + j]'s count of keys (its tensor-parallel shards)
# and counts only when all of them exist, all read in one snapshot.
_PREFIX = """
local ns, n = ARGV[1], tonumber(ARGV[2])
local pos = 3 + n
for j = 1, n do
  local per = tonumber(ARGV[2 + j])
  for i = pos, pos + per - 1 do
    if redis.call('EXISTS', ns .. ':e:' .. ARGV[i]) == 0 then return j - 1 end
  end
  pos = pos + per
end
return n
"""

# Per chunk (counts as for _PREFIX), whether all of its keys exist.
_EXISTS = """
local ns, n = ARGV[1], tonumber(ARGV[2])
local pos = 3 + n
local out = {}
for j = 1, n do
  local per = tonumber(ARGV[2 + j])
  local all = 1
  for i = pos, pos + per - 1 do
    if redis.call('EXISTS', ns .. ':e:' .. ARGV[i]) == 0 then all = 0 break end
  end
  out[j] = all
  pos = pos + per
end
return out
"""

_CLAIM = """
local ns, w, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local k = ARGV[i]
  if redis.call('EXISTS', ns .. ':e:' .. k) == 1 then
    out[#out + 1] = 0
  elseif redis.call('SET', ns .. ':c:' .. k, w, 'NX', 'PX', ttl) then
    out[#out + 1] = 1
  elseif redis.call('GET', ns .. ':c:' .. k) == w then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Drop every entry writer w published before this start (its log is the truth now).
_PURGE = """
local ns, w = ARGV[1], ARGV[2]
local s = ns .. ':k:' .. w
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', s)) do
  local e = ns .. ':e:' .. k
  if redis.call('HGET', e, 'w') == w then
    redis.call('DEL', e)
    n = n + 1
  end
end
redis.call('DEL', s)
return n
"""


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

    Notes
    -----
    Every method is one round trip whatever the batch size; errors of the
    ``redis`` package (server down or restarting) propagate as they are, and
    the shared backend turns them into misses. Run Redis without persistence
    (``--save '' --appendonly no``): after a restart the writers re-publish
    from their own index logs, which are the truth.
    """

    def __init__(self, url: str, namespace: str = "gdskv", lease_ttl: float = 5.0, claim_ttl: float = 30.0):
        self.url = url
        self.ns = namespace
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.claim_ms = max(1, int(claim_ttl * 1000))
        self.client = connect(url)
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("publish", _PUBLISH), ("retract", _RETRACT), ("unclaim", _UNCLAIM), ("acquire", _ACQUIRE),
            ("prefix", _PREFIX), ("claim", _CLAIM), ("purge", _PURGE), ("exists", _EXISTS), ("release", _RELEASE))}
        self._tokens = 0

    def _run(self, name: str, args: Sequence) -> object:
        return self._scripts[name](args=[self.ns, *args])

    # -- writers ------------------------------------------------------------------
    def register(self, writer: str, layout: dict) -> None:
        """Record ``writer``'s pool layout (readers map offsets to its files with it)."""
        p = self.client.pipeline(transaction=True)
        p.delete(f"{self.ns}:w:{writer}")
        p.hset(f"{self.ns}:w:{writer}", mapping={k: str(v) for k, v in layout.items()})
        p.sadd(f"{self.ns}:writers", writer)
        p.execute()

    def layout(self, writer: str) -> dict:
        return self.client.hgetall(f"{self.ns}:w:{writer}")

    def purge(self, writer: str) -> int:
        """Delete every entry ``writer`` published before; returns how many."""
        return int(self._run("purge", [writer]))

    def publish(self, writer: str, entries: Sequence[Published]) -> list[str]:
        """Make ``entries`` visible; returns the keys another writer had published first."""
        args: list = [writer]
        for e in entries:
            args += [e.key, e.generation, e.offset, e.nbytes, e.phys_size, ",".join(map(str, e.shape)),
                     e.dtype, e.fmt, str(e.checksum), e.boot]
        return list(self._run("publish", args)) if entries else []

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
        ok, ms = bool(out[0]), out[1:]
        return ok, (ms if ok or not unleased else [1] * len(items))

    def unclaim(self, writer: str, keys: Sequence[str]) -> None:
        """Drop ``writer``'s put claims on ``keys`` (its puts failed or were not made)."""
        if keys:
            self._run("unclaim", [writer, *keys])

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

    def release(self, token: str, leased: Sequence[str]) -> None:
        """End ``token``'s leases on the ``writer:generation`` pairs ``acquire`` returned (one round trip)."""
        if leased:
            self._run("release", [token, *set(leased)])

    @staticmethod
    def _chunk_args(chunks: Sequence[Sequence[str]]) -> list:
        return [len(chunks), *[len(c) for c in chunks], *[k for c in chunks for k in c]]

    def prefix(self, chunks: Sequence[Sequence[str]]) -> int:
        """How many chunks, from the first, have every one of their keys published (one snapshot)."""
        if not chunks:
            return 0
        return int(self._run("prefix", self._chunk_args(chunks)))

    def exists(self, chunks: Sequence[Sequence[str]]) -> list[bool]:
        """Per chunk, whether every one of its keys is published (one snapshot)."""
        if not chunks:
            return []
        return [bool(x) for x in self._run("exists", self._chunk_args(chunks))]

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
            sec, usec = (res := p.execute())[0]
            now = sec * 1000 + usec // 1000
            for last in res[1:]:
                if last:
                    best = max(best, int(last[0][1]) - now)
        return best

    def count(self) -> int:
        """Entries published (a scan: for tests and tools, not the serving path)."""
        return sum(1 for _ in self.client.scan_iter(f"{self.ns}:e:*", count=1000))

    # -- restart detection -------------------------------------------------------------
    def epoch(self) -> Optional[str]:
        return self.client.get(f"{self.ns}:epoch")

    def set_epoch(self) -> str:
        """The server's epoch token, set now if absent (the server started empty)."""
        self.client.set(f"{self.ns}:epoch", uuid.uuid4().hex, nx=True)
        return self.client.get(f"{self.ns}:epoch")

    def rebuild_requests(self) -> int:
        return int(self.client.get(f"{self.ns}:rebuild") or 0)

    def request_rebuild(self) -> None:
        """Ask every writer to re-publish its chunks from its index (seen within a tick)."""
        self.client.incr(f"{self.ns}:rebuild")

    def close(self) -> None:
        self.client.close()

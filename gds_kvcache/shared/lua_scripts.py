"""The Lua scripts of ``RedisIndex``: one per Redis operation that must be atomic against other processes.

Each runs as one ``EVALSHA`` with ``ARGV[1]`` the namespace; the keys they
touch are the schema in ``redis_index``'s docstring. ``RedisIndex`` registers
them and builds their arguments.

Whatever else wrote under the namespace, no script raises over it: a value of
the wrong Redis type where an entry, a lease set, a claim or a writer's key
set belongs is a miss (an entry, a claim) or is repaired (deleted, then
written as it should be), so one bad value never fails the batch around it.
An entry counts only when it is a hash with every field a reader needs.
"""

# Lua shared by the scripts. ``typ(k)``: Redis's type name of k ('none' when absent); ``fix(k,
# want)``: delete k if it holds another type. ``try(...)``: redis.pcall, with an error (a value of
# the wrong type) as nil: the common path costs one call, as the plain command did.
_TYP = """
local function typ(k) return redis.call('TYPE', k)['ok'] end
local function fix(k, want)
  local t = typ(k)
  if t ~= 'none' and t ~= want then redis.call('DEL', k) end
end
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r['err'] then return nil end
  return r
end
-- A whole entry: a hash with its 10 fields (a hash missing one is no entry: readers miss it,
-- and its writer's audit publishes it again). HLEN of another type is an error table.
local function is_entry(e)
  local n = redis.pcall('HLEN', e)
  return type(n) == 'number' and n >= 10
end
"""

__all__ = ["PUBLISH", "RETRACT", "UNCLAIM", "ACQUIRE", "RELEASE", "PREFIX", "EXISTS", "CLAIM", "PURGE", "STATUS"]

PUBLISH = _TYP + """
local ns, w = ARGV[1], ARGV[2]
local dups = {}
fix(ns .. ':k:' .. w, 'set')
for i = 3, #ARGV, 10 do
  local k = ARGV[i]
  local e = ns .. ':e:' .. k
  local cur = try('HGET', e, 'w')
  if cur == nil then redis.call('DEL', e) cur = false end      -- not a hash: garbage, replaced
  if cur and cur ~= w then
    dups[#dups + 1] = k
  else
    redis.call('HSET', e, 'w', w, 'g', ARGV[i+1], 'o', ARGV[i+2], 'n', ARGV[i+3], 'p', ARGV[i+4],
               'sh', ARGV[i+5], 'dt', ARGV[i+6], 'fm', ARGV[i+7], 'cs', ARGV[i+8], 'b', ARGV[i+9])
    redis.call('SADD', ns .. ':k:' .. w, k)
  end
  redis.call('DEL', ns .. ':c:' .. k)
end
fix(ns .. ':s:' .. w, 'string')
local seq = redis.call('INCR', ns .. ':s:' .. w)
return {seq, dups}
"""

# Retract (key, generation) entries of writer w and say, per item, how many ms the longest
# live lease on (w, g) has left: the owner reuses the extent only after. The first reply is 1
# if the server's epoch is still the caller's (0: it restarted, and forgot every lease). With
# ``unleased`` an entry that has a live lease stays (an eviction moves on to another victim),
# and nothing is retracted when the epoch changed.
RETRACT = _TYP + """
local ns, w, epoch, unleased = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local ok = 0
if typ(ns .. ':epoch') == 'string' and redis.call('GET', ns .. ':epoch') == epoch then ok = 1 end
fix(ns .. ':k:' .. w, 'set')
if unleased and ok == 0 then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
fix(ns .. ':s:' .. w, 'string')
local out = {ok, redis.call('INCR', ns .. ':s:' .. w)}
for i = 5, #ARGV, 2 do
  local k, g = ARGV[i], ARGV[i+1]
  local l = ns .. ':l:' .. w .. ':' .. g
  -- No lease can be in a value of another type (ZADD would have failed): such garbage goes.
  if try('ZREMRANGEBYSCORE', l, '-inf', now) == nil then redis.call('DEL', l) end
  local last = redis.call('ZRANGE', l, -1, -1, 'WITHSCORES')
  local ms = 0
  if last[2] then ms = tonumber(last[2]) - now end
  if not (unleased and ms > 0) then
    local e = ns .. ':e:' .. k
    local cur = try('HMGET', e, 'w', 'g') or {false, false}
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
UNCLAIM = _TYP + """
local ns, w = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local c = ns .. ':c:' .. ARGV[i]
  fix(c, 'string')
  if redis.call('GET', c) == w then redis.call('DEL', c) end
end
return 0
"""

# Lease every listed entry that exists (one ZADD per entry) and return its fields as one
# tab-joined string per entry: a reply of one bulk string per chunk parses several times faster
# than one per field. Per writer, its boot and its newest-lease marker are touched once.
ACQUIRE = _TYP + """
local ns, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boots = {}
local out = {}
for i = 4, #ARGV do
  local e = ns .. ':e:' .. ARGV[i]
  local v = try('HMGET', e, 'w', 'g', 'o', 'n', 'p', 'sh', 'dt', 'fm', 'cs', 'b') or {}
  local whole = #v == 10
  for f = 1, #v do if not v[f] then whole = false end end
  local wb = nil
  if whole then
    wb = boots[v[1]]
    if not wb then
      wb = try('HGET', ns .. ':w:' .. v[1], 'boot') or ''
      boots[v[1]] = wb
    end
  end
  -- An entry of an earlier run of its writer (which may be reusing that extent now) is not leased.
  if whole and wb ~= '' and v[10] == wb then
    local l = ns .. ':l:' .. v[1] .. ':' .. v[2]
    if try('ZADD', l, now + ttl, token) == nil then       -- a garbage lease set: replaced
      redis.call('DEL', l)
      redis.call('ZADD', l, now + ttl, token)
    end
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
RELEASE = _TYP + """
local ns, token = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local l = ns .. ':l:' .. ARGV[i]
  try('ZREM', l, token)
end
return 0
"""

# Hit prefix over chunks; chunk j is ARGV[3 + j]'s count of keys (its tensor-parallel shards)
# and counts only when all of them exist, all read in one snapshot.
PREFIX = _TYP + """
local ns, n = ARGV[1], tonumber(ARGV[2])
local pos = 3 + n
for j = 1, n do
  local per = tonumber(ARGV[2 + j])
  for i = pos, pos + per - 1 do
    local h = redis.pcall('HLEN', ns .. ':e:' .. ARGV[i])     -- is_entry, inlined: once per key of a prompt
    if type(h) ~= 'number' or h < 10 then return j - 1 end
  end
  pos = pos + per
end
return n
"""

# Per chunk (counts as for PREFIX), whether all of its keys exist.
EXISTS = _TYP + """
local ns, n = ARGV[1], tonumber(ARGV[2])
local pos = 3 + n
local out = {}
for j = 1, n do
  local per = tonumber(ARGV[2 + j])
  local all = 1
  for i = pos, pos + per - 1 do
    local h = redis.pcall('HLEN', ns .. ':e:' .. ARGV[i])     -- is_entry, inlined
    if type(h) ~= 'number' or h < 10 then all = 0 break end
  end
  out[j] = all
  pos = pos + per
end
return out
"""

CLAIM = _TYP + """
local ns, w, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local k = ARGV[i]
  local c = ns .. ':c:' .. k
  if is_entry(ns .. ':e:' .. k) then
    out[#out + 1] = 0
  elseif redis.call('SET', c, w, 'NX', 'PX', ttl) then
    out[#out + 1] = 1
  else
    local holder = try('GET', c)
    -- A claim of the wrong type, or left without expiry (written by hand, PERSISTed), would
    -- block the key for good: it is replaced by this one.
    if holder == nil or redis.call('PTTL', c) == -1 then
      redis.call('DEL', c)
      redis.call('SET', c, w, 'PX', ttl)
      holder = w
    end
    out[#out + 1] = holder == w and 1 or 0
  end
end
return out
"""

# Drop every entry writer w published before this start (its log is the truth now).
PURGE = _TYP + """
local ns, w = ARGV[1], ARGV[2]
local s = ns .. ':k:' .. w
local n = 0
fix(s, 'set')
for _, k in ipairs(redis.call('SMEMBERS', s)) do
  local e = ns .. ':e:' .. k
  if typ(e) == 'hash' and redis.call('HGET', e, 'w') == w then
    redis.call('DEL', e)
    n = n + 1
  end
end
redis.call('DEL', s)
return n
"""

# What a writer's housekeeping pass needs in one round trip: the epoch token, the rebuild
# counter and writer w's state counter (false where absent or not a string).
STATUS = _TYP + """
local ns, w = ARGV[1], ARGV[2]
local function str(k)
  if typ(k) == 'string' then return redis.call('GET', k) end
  return false
end
return {str(ns .. ':epoch'), str(ns .. ':rebuild'), str(ns .. ':s:' .. w)}
"""

"""The Redis driver's server-side scripts (see runtime/drivers/redis.py for how they fit).

Every state change of a queue is one of these Lua scripts, run by the server atomically.
"""

# Entry fields travel as msgpack arrays [f1, v1, f2, v2, ...] (members of the delayed set have a
# unique tag in front), unpacked by the server's cmsgpack.

_TAKE = """
local stream, delayed = KEYS[1], KEYS[2]
local group, me, n, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, m in ipairs(due) do
  local t = cmsgpack.unpack(m)
  redis.call('XADD', stream, '*', unpack(t, 2))
  redis.call('ZREM', delayed, m)
end
local out = {}
local rel = redis.call('XPENDING', stream, group, '-', '+', n, ARGV[6])
if #rel > 0 then
  local ids, counts = {}, {}
  for i, r in ipairs(rel) do ids[i] = r[1]; counts[r[1]] = r[4] + 1 end
  local got = redis.call('XCLAIM', stream, group, me, 0, unpack(ids))
  for _, e in ipairs(got) do
    if e and e[2] then out[#out + 1] = {e[1], counts[e[1]], e[2]} end
  end
end
if #out < n then
  local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', n - #out, 'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do out[#out + 1] = {e[1], 1, e[2]} end
  end
end
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local next_due = -1
if #first > 0 then next_due = first[2] end
return {next_due, out}
"""

_ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return n
"""

# Retry: only if the entry is still this consumer's (else someone else took it over).
_RETRY = """
local stream, delayed = KEYS[1], KEYS[2]
local group, me, id, due, member = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local p = redis.call('XPENDING', stream, group, id, id, 1, me)
if #p == 0 then return 0 end
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
if due > 0 then
  redis.call('ZADD', delayed, due, member)
else
  local t = cmsgpack.unpack(member)
  redis.call('XADD', stream, '*', unpack(t, 2))
end
return 1
"""

# Release: ARGV = group, me, released name, then (id, delivery count to set) pairs.
_RELEASE = """
local stream, group, me, rel = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1, me)
  if #p > 0 then
    redis.call('XCLAIM', stream, group, rel, 0, id, 'RETRYCOUNT', tonumber(ARGV[i + 1]), 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Renew: reset the idle time of the given entries still owned by me; returns the lost ones.
_RENEW = """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local mine, lost = {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1, me)
  if #p > 0 then mine[#mine + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
end
if #mine > 0 then
  local args = {stream, group, me, 0}
  for _, id in ipairs(mine) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return lost
"""

# Claim: entries of the named consumers (any idle time), then of anyone idle >= min_idle,
# this consumer's own included unless in flight here (an entry whose settle failed while the
# server was away is pending under this name but held by nobody).
# ARGV = group, me, released name, min_idle_ms, count, number of names, names..., ids in flight here...
_CLAIM = """
local stream, group, me, rel = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local min_idle, n, k = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local held = {}
for i = 7 + k, #ARGV do held[ARGV[i]] = true end
local out = {}
local function claim(rows, idle)
  local ids, counts = {}, {}
  for _, r in ipairs(rows) do
    if r[2] ~= rel and not held[r[1]] and #ids < n - #out then
      ids[#ids + 1] = r[1]; counts[r[1]] = r[4] + 1
    end
  end
  if #ids == 0 then return end
  local got = redis.call('XCLAIM', stream, group, me, idle, unpack(ids))
  for _, e in ipairs(got) do
    if e and e[2] then out[#out + 1] = {e[1], counts[e[1]], e[2]} end
  end
end
for i = 7, 6 + k do
  if #out < n then claim(redis.call('XPENDING', stream, group, '-', '+', n, ARGV[i]), 0) end
  if ARGV[i] ~= me and #redis.call('XPENDING', stream, group, '-', '+', 1, ARGV[i]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, ARGV[i])
  end
end
if #out < n then
  claim(redis.call('XPENDING', stream, group, 'IDLE', min_idle, '-', '+', n + 1000), min_idle)
end
return out
"""

# Stats: {xlen, pending, released, zcard, due}
_STATS = """
local stream, delayed = KEYS[1], KEYS[2]
local xlen = redis.call('XLEN', stream)
local s = redis.call('XPENDING', stream, ARGV[1])
local released = 0
if s[4] then
  for _, c in ipairs(s[4]) do if c[1] == ARGV[2] then released = tonumber(c[2]) end end
end
return {xlen, s[1], released, redis.call('ZCARD', delayed), redis.call('ZCOUNT', delayed, '-inf', ARGV[3])}
"""

# Bounded publish: add as many as fit under the limit of ready entries; how many.
_PUT_BOUNDED = """
local stream, group, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])
local s = redis.call('XPENDING', stream, group)
local released = 0
if s[4] then
  for _, c in ipairs(s[4]) do if c[1] == ARGV[3] then released = tonumber(c[2]) end end
end
local ready = redis.call('XLEN', stream) - s[1] + released
local added = 0
for i = 4, #ARGV do
  if ready + added >= limit then break end
  redis.call('XADD', stream, '*', unpack(cmsgpack.unpack(ARGV[i])))
  added = added + 1
end
return added
"""

# Purge: everything not delivered (after the group's last-delivered id), released, delayed.
_PURGE = """
local stream, delayed, group, rel = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local last = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local name, lid
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then lid = g[i + 1] end
  end
  if name == group then last = lid end
end
local n = 0
while true do
  local rows = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 500)
  if #rows == 0 then break end
  local ids = {}
  for i, e in ipairs(rows) do ids[i] = e[1] end
  n = n + redis.call('XDEL', stream, unpack(ids))
  last = ids[#ids]
end
while true do
  local p = redis.call('XPENDING', stream, group, '-', '+', 500, rel)
  if #p == 0 then break end
  local ids = {}
  for i, r in ipairs(p) do ids[i] = r[1] end
  redis.call('XACK', stream, group, unpack(ids))
  n = n + redis.call('XDEL', stream, unpack(ids))
end
n = n + redis.call('ZCARD', delayed)
redis.call('DEL', delayed)
return n
"""

"""The server-side Lua scripts of the Redis block index (see :mod:`kvstrata.index.redis` for the key schema).

They live in a Python module, not in ``.lua`` files, so that they ship with the package without any
package-data configuration. Redis runs Lua 5.1 with the ``bit`` library.
"""

from __future__ import annotations

__all__ = ["INSTANCES", "WALK", "WRITE"]

#: A block entry is a string of 9-byte records, one per (instance, tier) holding the block:
#: tier (u8: 0 device, 1 host, 2 disk, 3 remote), instance id (u32 big-endian), epoch (u32 big-endian, the
#: instance's epoch when it was written). Strings (not hashes) because Redis hands a Lua script one string
#: per MGET'd key far faster than a table per HGETALL; records are decoded with string.byte, no allocation.
#:
#: The prefix walk: one round trip per lookup.
#: KEYS[1] = names hash (id -> name), KEYS[2] = epochs hash (id -> epoch); ARGV[2] = the block key prefix,
#: ARGV[3] = the prompt's 16-byte block keys, concatenated in prompt order, ARGV[1] = the lease key prefix
#: (the lease of instance N is ARGV[1] .. N). Block and lease keys are not declared in KEYS: lease key names
#: are only known here, and one packed argument costs the client far less than a thousand; they all share
#: the namespace's hash tag, hence the slot of the declared keys, so this runs unchanged on Redis Cluster.
#: Blocks are fetched with MGET in growing runs (32, 64, ...) so that a short match costs little and a long
#: one few calls. The walk stops at the first block that no live instance still in the prefix holds, in a
#: tier, under its current epoch.
#: Returns a flat array: per matching instance, name, prefix blocks, then the depth in each of the 4 tiers.
WALK = r"""
local live = {}
local active = nil
local nactive = 0
local prefix = {}
local depth = {}
local order = {}
local i = 0
local run = 32
local stop = false
local prev = nil
local function drop_tiers(id, m, at)
  local d = depth[id]
  for t = 0, 3 do
    if bit.band(m, bit.lshift(1, t)) ~= 0 then d[t + 1] = at end
  end
end
local blob = ARGV[3]
local nkeys = math.floor(#blob / 16)
local bprefix = ARGV[2]
local k = 1
while k <= nkeys and not stop do
  local last = math.min(k + run - 1, nkeys)
  local names = {}
  for q = k, last do
    names[#names + 1] = bprefix .. string.sub(blob, q * 16 - 15, q * 16)
  end
  local vals = redis.call('MGET', unpack(names))
  k = last + 1
  run = math.min(run * 2, 512)
  for q = 1, #vals do
    local v = vals[q]
    if not v then
      stop = true
      break
    end
    if v == prev then
      -- the same holders as the block before (the common case inside a shared prefix): Lua strings are
      -- interned, so this is a pointer compare, and nothing can change
      i = i + 1
    else
      prev = v
      local here = {}
      local nhere = 0
      for j = 1, #v - 8, 9 do
        local t, a, b, c, d, e1, e2, e3, e4 = string.byte(v, j, j + 8)
        local id = ((a * 256 + b) * 256 + c) * 256 + d
        local ep = live[id]
        if ep == nil then
          ep = false
          local name = redis.call('HGET', KEYS[1], id)
          if name and redis.call('EXISTS', ARGV[1] .. name) == 1 then
            ep = tonumber(redis.call('HGET', KEYS[2], id) or '0') % 4294967296
          end
          live[id] = ep
        end
        if ep == ((e1 * 256 + e2) * 256 + e3) * 256 + e4 and (active == nil or active[id] ~= nil) then
          local m = here[id]
          if m == nil then
            nhere = nhere + 1
            m = 0
          end
          here[id] = bit.bor(m, bit.lshift(1, t))
        end
      end
      if nhere == 0 then
        stop = true
        break
      end
      if active == nil then
        active = here
        nactive = nhere
        for id, _ in pairs(here) do
          depth[id] = {0, 0, 0, 0}
          order[#order + 1] = id
        end
      else
        if nhere < nactive then
          for id, m in pairs(active) do
            if here[id] == nil then
              prefix[id] = i
              drop_tiers(id, m, i)
              active[id] = nil
              nactive = nactive - 1
            end
          end
        end
        for id, h in pairs(here) do
          local m = active[id]
          local still = bit.band(m, h)
          if still ~= m then
            drop_tiers(id, bit.band(m, bit.bnot(h)), i)
            active[id] = still
          end
        end
      end
      i = i + 1
    end
  end
end
local out = {}
for _, id in ipairs(order) do
  local n = prefix[id]
  local m = active[id]
  if m ~= nil then
    n = i
    drop_tiers(id, m, i)
  end
  local d = depth[id]
  out[#out + 1] = redis.call('HGET', KEYS[1], id)
  out[#out + 1] = n
  out[#out + 1] = d[1]
  out[#out + 1] = d[2]
  out[#out + 1] = d[3]
  out[#out + 1] = d[4]
end
return out
"""

#: One write: add / remove block keys, clear (epoch bump), or heartbeat. Every write renews the lease.
#: KEYS[1] = ids hash (name -> id), KEYS[2] = names hash, KEYS[3] = id counter, KEYS[4] = epochs hash,
#: KEYS[5] = this instance's lease key; ARGV[6] = the block key prefix, ARGV[7] = the 16-byte block keys,
#: concatenated.
#: ARGV[1] = op ('a' add, 'r' remove, 'c' clear, 'h' heartbeat), ARGV[2] = instance name,
#: ARGV[3] = tier (0-3), ARGV[4] = lease TTL in ms, ARGV[5] = block entry TTL in s (0: none).
#: A write rewrites the block's records of this instance: it drops its records of older epochs (what a
#: clear left behind), then adds or removes the (tier, epoch) record; an entry left empty is deleted.
WRITE = r"""
local id = redis.call('HGET', KEYS[1], ARGV[2])
if not id then
  id = tostring(redis.call('INCR', KEYS[3]))
  redis.call('HSET', KEYS[1], ARGV[2], id)
  redis.call('HSET', KEYS[2], id, ARGV[2])
end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[4])
local op = ARGV[1]
if op == 'c' then
  redis.call('HINCRBY', KEYS[4], id, 1)
  return 0
end
if op == 'h' then return 0 end
local nid = tonumber(id)
local ep = tonumber(redis.call('HGET', KEYS[4], id) or '0') % 4294967296
local tier = tonumber(ARGV[3])
local function u32(x)
  return string.char(math.floor(x / 16777216) % 256, math.floor(x / 65536) % 256,
                     math.floor(x / 256) % 256, x % 256)
end
local mine = u32(nid)
local rec = string.char(tier) .. mine .. u32(ep)
local ttl = tonumber(ARGV[5])
local adding = op == 'a'
local function merge(key, v)
  local parts = {}
  local found = false
  local changed = false
  for j = 1, #v - 8, 9 do
    local r = string.sub(v, j, j + 8)
    if string.sub(r, 2, 5) == mine then
      if string.sub(r, 6, 9) ~= string.sub(rec, 6, 9) then
        changed = true
      elseif string.byte(r, 1) == tier then
        found = true
        if adding then parts[#parts + 1] = r else changed = true end
      else
        parts[#parts + 1] = r
      end
    else
      parts[#parts + 1] = r
    end
  end
  if adding and not found then
    parts[#parts + 1] = rec
    changed = true
  end
  if changed then
    if #parts == 0 then
      redis.call('DEL', key)
    elseif ttl > 0 then
      redis.call('SET', key, table.concat(parts), 'EX', ttl)
    else
      redis.call('SET', key, table.concat(parts))
    end
  elseif adding and ttl > 0 then
    redis.call('EXPIRE', key, ttl)
  end
end
local blob = ARGV[7]
local nkeys = math.floor(#blob / 16)
for k = 1, nkeys do
  local key = ARGV[6] .. string.sub(blob, k * 16 - 15, k * 16)
  if adding then
    -- a block nobody holds yet (the common case when ingesting) costs one call
    local fresh
    if ttl > 0 then
      fresh = redis.call('SET', key, rec, 'NX', 'EX', ttl)
    else
      fresh = redis.call('SET', key, rec, 'NX')
    end
    if not fresh then
      local v = redis.call('GET', key)
      if v then merge(key, v) else redis.call('SET', key, rec) end
    end
  else
    local v = redis.call('GET', key)
    if v then merge(key, v) end
  end
end
return nkeys
"""

#: The live instances. KEYS[1] = names hash, KEYS[2] = epochs hash; ARGV[1] = the lease key prefix.
#: Returns a flat array: name, epoch, lease milliseconds left.
INSTANCES = r"""
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for j = 1, #all, 2 do
  local ttl = redis.call('PTTL', ARGV[1] .. all[j + 1])
  if ttl > 0 then
    out[#out + 1] = all[j + 1]
    out[#out + 1] = redis.call('HGET', KEYS[2], all[j]) or '0'
    out[#out + 1] = ttl
  end
end
return out
"""

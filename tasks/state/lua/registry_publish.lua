-- A worker's full publish: its entry with its TTL, its deadline, and its routing index
-- entries brought in line with its new memo (tasks/state/index.py): the entries the old memo
-- lists and the new one does not are removed, the new ones written. Every index entry is
-- keyed by the worker's name, so nothing another worker wrote is touched.
-- KEYS: the worker's entry, its memo, worker deadlines, the offered tasks
-- ARGV: the worker's name, the entry JSON, the TTL (ms), the new memo JSON, its free bytes
-- Returns the worker's new deadline (epoch ms).
redis.replicate_commands()
local name, ttl, free = ARGV[1], tonumber(ARGV[3]), ARGV[5]
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
local old = cjson.decode(redis.call('GET', KEYS[2]) or '{}')
local new = cjson.decode(ARGV[4])

local function set_of(list)
  local out = {}
  for _, key in ipairs(list or {}) do out[key] = true end
  return out
end

local keep = set_of(new.serving)
for _, key in ipairs(old.serving or {}) do
  if not keep[key] then redis.call('SREM', key, name) end
end
for _, key in ipairs(new.serving) do redis.call('SADD', key, name) end

for key, _ in pairs(old.holders or {}) do
  if new.holders[key] == nil then redis.call('HDEL', key, name) end
end
for key, tenant in pairs(new.holders) do redis.call('HSET', key, name, tenant) end

keep = set_of(new.free)
for _, key in ipairs(old.free or {}) do
  if not keep[key] then redis.call('ZREM', key, name) end
end
for _, key in ipairs(new.free) do redis.call('ZADD', key, free, name) end

for _, task in ipairs(new.tasks) do redis.call('ZADD', KEYS[4], 'GT', deadline, task) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], deadline, name)
return deadline

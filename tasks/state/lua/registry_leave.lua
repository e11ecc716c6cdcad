-- A worker leaves the registry, or the reaper removes a dead one: its routing index entries
-- (from its memo) and its entry go, and its memo keeps only its queues. Leaving keeps its
-- deadline, at 0, so the reaper's next turn reaps it; reaping drains its own queues now,
-- oldest first, and moves it from the deadlines to the reaped set, watched until ARGV[3]
-- ms from now (tasks/state/lua/registry_watch.lua) for messages the broker puts back late.
-- KEYS: the worker's entry, its memo, worker deadlines, reaped workers
-- ARGV: the worker's name, 'leave' or 'reap', for 'reap' the ms its queues stay watched
-- Returns for 'reap': {} if the worker is live after all (its deadline is in the future or
-- its entry exists), else {queue, destination, moved, ...} of each own queue; 1 for 'leave'.
redis.replicate_commands()
local name, mode = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mode == 'reap' then
  local deadline = redis.call('ZSCORE', KEYS[3], name)
  if (deadline and tonumber(deadline) > now) or redis.call('EXISTS', KEYS[1]) == 1 then
    return {}
  end
end
local memo = cjson.decode(redis.call('GET', KEYS[2]) or '{}')
for _, key in ipairs(memo.serving or {}) do redis.call('SREM', key, name) end
for key, _ in pairs(memo.holders or {}) do redis.call('HDEL', key, name) end
for _, key in ipairs(memo.free or {}) do redis.call('ZREM', key, name) end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], cjson.encode({queues = memo.queues or {}}))
if mode == 'leave' then
  redis.call('ZADD', KEYS[3], 0, name)
  return 1
end
local out = {}
for _, pair in ipairs(memo.queues or {}) do
  local moved = 0
  while redis.call('LMOVE', pair[1], pair[2], 'RIGHT', 'LEFT') do moved = moved + 1 end
  out[#out + 1] = pair[1]
  out[#out + 1] = pair[2]
  out[#out + 1] = moved
end
redis.call('ZREM', KEYS[3], name)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), name)
return out

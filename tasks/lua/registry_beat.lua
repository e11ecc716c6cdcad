-- One heartbeat of a worker whose entry is unchanged: its TTL renewed, its deadline and the
-- deadlines of the tasks it offers moved on. The entry itself is not rewritten.
-- KEYS: the worker's entry, worker deadlines, the offered tasks
-- ARGV: the worker's name, the TTL (ms), then the tasks it offers
-- Returns the new deadline (epoch ms), or 0 when the entry is missing (expired, reaped,
-- Redis restarted): nothing is written then, and the worker publishes in full.
redis.replicate_commands()
local ttl = tonumber(ARGV[2])
if redis.call('PEXPIRE', KEYS[1], ttl) == 0 then return 0 end
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
if #ARGV >= 3 then  -- one ZADD for every task it offers
  local args = {'GT'}
  for i = 3, #ARGV do
    args[#args + 1] = deadline
    args[#args + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[3], unpack(args))
end
return deadline

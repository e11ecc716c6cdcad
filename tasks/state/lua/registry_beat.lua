-- One heartbeat of a worker whose entry is unchanged: its TTL renewed, its deadline and the
-- deadlines of the tasks it offers moved on, and, when the worker's reaper period has come,
-- its bid for the pool's reaper turn (worker/reaper.py), so the bid costs no round trip of
-- its own. The entry itself is not rewritten.
-- KEYS: the worker's entry, worker deadlines, the offered tasks, the reaper turn
-- ARGV: the worker's name, the TTL (ms), the turn's TTL (ms; 0: no bid this beat), then the
--       tasks it offers
-- Returns {deadline (epoch ms), 1 if this beat won the reaper turn else 0}; {0, 0} when the
-- entry is missing (expired, reaped, Redis restarted): nothing is written then, and the
-- worker publishes in full.
redis.replicate_commands()
local ttl = tonumber(ARGV[2])
if redis.call('PEXPIRE', KEYS[1], ttl) == 0 then return {0, 0} end
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
if #ARGV >= 4 then  -- one ZADD for every task it offers
  local args = {'GT'}
  for i = 4, #ARGV do
    args[#args + 1] = deadline
    args[#args + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[3], unpack(args))
end
local won = 0
local turn = tonumber(ARGV[3])
if turn > 0 and redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', turn) then won = 1 end
return {deadline, won}

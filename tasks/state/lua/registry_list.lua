-- The live workers for a listing (`modelq ls`): O(workers), never on a job's path.
-- KEYS: worker deadlines
-- ARGV: the key prefix of worker entries (the name follows it)
-- Returns name, deadline (epoch ms), entry ('' if it vanished) for each live worker.
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[1] .. live[i]) or ''
end
return out

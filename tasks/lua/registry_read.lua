-- What a router reads on each submit, in one round trip: the values of some keys, then every
-- registered worker name with its entry.
-- KEYS: the set of worker names, then the other keys to read
-- ARGV: the key prefix of worker entries (the name follows it)
-- Returns the values of KEYS[2..] ('' when missing), then name, entry pairs ('' once the
-- entry expired).
local out = {}
for i = 2, #KEYS do out[#out + 1] = redis.call('GET', KEYS[i]) or '' end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = name
  out[#out + 1] = redis.call('GET', ARGV[1] .. name) or ''
end
return out

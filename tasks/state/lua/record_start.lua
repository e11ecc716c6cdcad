-- A job's lease (SET NX PX) and, when the lease is the caller's and the record is as
-- submitted (its revision is the expected one, 1), its start: the running record and event.
-- KEYS: lease, job, revision, events, cancel
-- ARGV: lease token, lease ttl (ms), revision expected, running record JSON, record ttl (s),
--       events maxlen, event JSON
-- Returns {lease holder, 1 if started else 0, the stored record when not started ('' if
-- none), the cancel flag ('' if none), the record's revision now (0 if none)}.
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local holder = redis.call('GET', KEYS[1]) or ''
local current = redis.call('GET', KEYS[2]) or ''
local revision = redis.call('GET', KEYS[3]) or '0'
local started = 0
if holder == ARGV[1] and current ~= '' and revision == ARGV[3] then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  revision = redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[7])
  started, current = 1, ''
end
return {holder, started, current, redis.call('GET', KEYS[5]) or '', tonumber(revision)}

-- A job started and finished in one write, with both events, while its record is as
-- submitted (its revision is the expected one, 1) and no one holds its lease; as a final
-- write it ends the event stream's life, drops the cancel flag, wakes waiters on 'done' and
-- deletes each key to release that still holds its value.
-- KEYS: job, revision, events, cancel, done, lease, then the keys to release
-- ARGV: revision expected, final record JSON, record ttl (s), events maxlen,
--       running event JSON, final event JSON, then the value each key to release must hold
--       (ARGV[i] for KEYS[i], i >= 7)
-- Returns 1 if written, else 0 (nothing written).
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[1]) == 0
    or (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[5])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
redis.call('XADD', KEYS[5], '*', 'record', ARGV[2])
redis.call('EXPIRE', KEYS[5], ARGV[3])
for i = 7, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return 1

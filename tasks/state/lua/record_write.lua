-- Compare-and-set of a job's record with its event: written only while the record's revision
-- is still the one its writer read (no revision key: a record older than revisions, read as 0).
-- A final record also ends the event stream's life, drops the cancel flag, wakes waiters on
-- the one-entry 'done' stream and deletes each key to release that still holds its value.
-- KEYS: job, revision, events, cancel, done, then the keys to release
-- ARGV: revision read, record JSON, record ttl (s), events maxlen, event JSON,
--       '1' if the record is final, then the value each key to release must hold
--       (ARGV[i + 1] for KEYS[i], i >= 6)
-- Returns 1 if written, 0 if the record changed or went away since it was read.
if redis.call('EXISTS', KEYS[1]) == 0 or (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[5])
if ARGV[6] == '1' then
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('DEL', KEYS[4])
  redis.call('XADD', KEYS[5], '*', 'record', ARGV[2])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
end
for i = 6, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then redis.call('DEL', KEYS[i]) end
end
return 1

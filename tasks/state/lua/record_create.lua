-- A new job's record (revision 1), its first event and its index entries; refuses to
-- overwrite an existing job.
-- KEYS: job, revision, events, then the sorted sets that index the job
-- ARGV: record JSON, record ttl (s), events maxlen, event JSON, index score, job id
-- Returns 1 if written, 0 if the job existed already.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[4])
for i = 4, #KEYS do redis.call('ZADD', KEYS[i], ARGV[5], ARGV[6]) end
return 1

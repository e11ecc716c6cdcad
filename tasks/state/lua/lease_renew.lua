-- Renew a job's lease, only while the caller holds it.
-- KEYS: lease
-- ARGV: the holder's token, the lease ttl (ms)
-- Returns 1 if renewed, 0 if the lease lapsed or another worker holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0

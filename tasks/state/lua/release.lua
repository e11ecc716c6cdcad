-- Compare-and-delete: each key is deleted only while it still holds its value (a job's
-- lease, its routing claim).
-- KEYS: the keys
-- ARGV: the value each must hold (ARGV[i] for KEYS[i])
-- Returns 1.
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return 1

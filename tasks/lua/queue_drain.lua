-- Move every waiting message of a dead worker's own queue onto the shared one, oldest first,
-- only while the worker is still out of the registry (it may have come back meanwhile).
-- KEYS: the worker's queue list, the destination queue list, the worker's registry entry
-- ARGV: (none)
-- Returns how many messages moved (0 when the worker is live).
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do
  moved = moved + 1
end
return moved

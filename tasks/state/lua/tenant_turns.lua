-- Fair turns between tenants' shares of queues (tasks/state/turns.py): for each queue given, note
-- the named shares that hold messages in its ring of turns, then move messages from the
-- shares in the ring onto the queue's own list, one per turn, oldest first in each share,
-- until that list holds ARGV[1] messages. A share whose last message moves leaves the ring;
-- a share with more goes to the back of it. A tenant with priority P has P shares: P turns.
-- Messages move whole, by LMOVE: a message is always on a list, never in flight in a script.
-- KEYS: per queue, in order: its list, its ring (list), its ring's members (set), then the
--       shares of it to note (ARGV[2 + i] of them for the i-th queue)
-- ARGV: depth (messages a queue's list is filled to), ttl of the ring keys in ms (0: none),
--       then the number of shares named after each queue's three keys
-- The shares in a ring are lists named by earlier calls, not in KEYS (no Redis Cluster).
-- Returns how many messages moved.
local depth, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local moved, at = 0, 1
for q = 3, #ARGV do
  local queue, ring, members = KEYS[at], KEYS[at + 1], KEYS[at + 2]
  local named = tonumber(ARGV[q])
  for i = at + 3, at + 2 + named do
    if redis.call('LLEN', KEYS[i]) > 0 and redis.call('SADD', members, KEYS[i]) == 1 then
      redis.call('LPUSH', ring, KEYS[i])
    end
  end
  at = at + 3 + named
  while redis.call('LLEN', queue) < depth do
    local share = redis.call('RPOP', ring)
    if not share then break end
    if redis.call('LMOVE', share, queue, 'RIGHT', 'LEFT') then moved = moved + 1 end
    if redis.call('LLEN', share) > 0 then
      redis.call('LPUSH', ring, share)
    else
      redis.call('SREM', members, share)
    end
  end
  if ttl > 0 then
    redis.call('PEXPIRE', ring, ttl)
    redis.call('PEXPIRE', members, ttl)
  end
end
return moved

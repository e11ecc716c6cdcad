-- The reaper's second look at workers it reaped: what the broker put back on their own
-- queues since (a message past its visibility timeout, or restored as a worker stopped) is
-- moved onto the matching shared queues, oldest first. A worker whose watch is over is
-- forgotten (its memo deleted); one that came back (live again) is no longer watched.
-- KEYS: worker deadlines, reaped workers, then the memo of each name in ARGV
-- ARGV: the reaped workers' names (KEYS[2 + i] is the memo of ARGV[i])
-- Returns {name, queue, destination, moved, ...} for each queue that had messages.
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, name in ipairs(ARGV) do
  local deadline = redis.call('ZSCORE', KEYS[1], name)
  local watched = redis.call('ZSCORE', KEYS[2], name)
  if deadline and tonumber(deadline) > now then
    redis.call('ZREM', KEYS[2], name)  -- back under the same name: its memo is its own again
  else
    local memo = cjson.decode(redis.call('GET', KEYS[2 + i]) or '{}')
    for _, pair in ipairs(memo.queues or {}) do
      local moved = 0
      while redis.call('LMOVE', pair[1], pair[2], 'RIGHT', 'LEFT') do moved = moved + 1 end
      if moved > 0 then
        out[#out + 1] = name
        out[#out + 1] = pair[1]
        out[#out + 1] = pair[2]
        out[#out + 1] = moved
      end
    end
    if not watched or tonumber(watched) <= now then
      redis.call('ZREM', KEYS[2], name)
      if not deadline then redis.call('DEL', KEYS[2 + i]) end
    end
  end
end
return out

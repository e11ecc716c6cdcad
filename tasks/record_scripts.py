"""The Lua scripts tasks/store.py runs: each one change of a job's record, atomic with what
goes with it (its events, its lease, its routing claim), in one round trip (no torch).

Keys are named by tasks/keys.py; each script's comment lists its KEYS and ARGV.
"""

from __future__ import annotations

# A new record with its first event and index entries: KEYS job, events, then the sorted
# sets that index it; ARGV record, ttl, maxlen, event, score, job id.
CREATE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[4])
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], ARGV[5], ARGV[6]) end
return 1
"""

# Lua shared by the record scripts below: KEYS job, events, cancel, done; ARGV[2] the final
# record, ARGV[3] the ttl. A final record ends the event stream's life, drops the cancel flag
# and wakes waiters on the one-entry 'done' stream.
ENDED = """
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'record', ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[3])
"""


def release(first_key: int, value_offset: int) -> str:
    """Lua deleting KEYS[first_key..] while each holds ARGV[i + value_offset]."""
    return f"""
for i = {first_key}, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + {value_offset}] then redis.call('DEL', KEYS[i]) end
end
"""


# Compare-and-set of a record with its event: KEYS job, events, cancel, done, then keys to
# release; ARGV seen, new, ttl, maxlen, event, terminal, then the values they must hold.
CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[5])
if ARGV[6] == '1' then""" + ENDED + "end" + release(first_key=5, value_offset=2) + "return 1"

# A job started and finished in one write, as submitted: KEYS job, events, cancel, done, its
# lease (which must not exist), then keys to release; ARGV submitted, final, ttl, maxlen,
# running event, final event, then the values the keys to release must hold.
RUN_THROUGH = """
if redis.call('EXISTS', KEYS[5]) == 1 or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[6])
""" + ENDED + release(first_key=6, value_offset=1) + "return 1"

# A job's lease, and its start when the record is as submitted: KEYS lease, job, events,
# cancel; ARGV token, lease ttl ms, submitted record, running record, record ttl, maxlen, event.
# Returns {lease holder, 1 if started, the record if not started, the cancel flag}.
START = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local holder = redis.call('GET', KEYS[1]) or ''
local current = redis.call('GET', KEYS[2]) or ''
local started = 0
if holder == ARGV[1] and current == ARGV[3] then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[7])
  started, current = 1, ''
end
return {holder, started, current, redis.call('GET', KEYS[4]) or ''}
"""

# Compare-and-delete: each KEYS[i] is deleted only while it holds ARGV[i].
RELEASE = release(first_key=1, value_offset=0) + "return 1"

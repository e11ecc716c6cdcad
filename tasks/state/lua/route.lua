-- Where a submitted job goes, from the routing indexes (tasks/state/keys.py) in one round trip,
-- whatever the pool's size: at most ARGV[6] candidates of each index are looked at, and
-- only those whose deadline is in the future (a dead worker's stale entries are ignored).
-- KEYS: worker deadlines, the tenant's limits, the free-bytes zset (the task's for a run
--   job, else every worker's), the offered tasks, then for a load: the request key's
--   serving set and its claim; for a job on a model key: the model's holders hash, and for
--   a run job on a model key also the model's load spec and its respawn claim
-- ARGV: 'load' or 'model', the run job's task ('' for other jobs), claim ms, the prefix of
--   worker queues (the name follows it), the shared queue, the most candidates to look at,
--   the job's tenant
-- Returns {outcome, limits ('' if none), tenants of the model's live holders, detail, claimed}:
--   outcome 'queue' (detail: the queue; claimed 1 when this call took the load's claim),
--   'model' (no live worker offering the task holds the model, and no spec of the job's
--   tenant or a shared one says how to load it again: ModelNotFound), or
--   'task' (workers are live and none offers the task; detail: the offered tasks, ',').
-- A run job on a model no live worker holds, whose spec is kept, goes where a load would
-- (the respawn claim in place of the load's claim): the worker loads it from the spec.
redis.replicate_commands()
local mode, task, claim_ms, qprefix, shared = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local most = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limits = redis.call('GET', KEYS[2]) or ''

local function usable(name)
  local deadline = redis.call('ZSCORE', KEYS[1], name)
  if not deadline or tonumber(deadline) <= now then return false end
  return task == '' or redis.call('ZSCORE', KEYS[3], name) ~= false
end

local function first_usable(names)
  table.sort(names)
  for _, name in ipairs(names) do
    if usable(name) then return name end
  end
  return nil
end

local function answer(outcome, tenants, detail, claimed)
  return {outcome, limits, tenants, detail, claimed}
end

local tenants, holders = {}, {}
if mode == 'model' then
  local pairs_ = redis.call('HRANDFIELD', KEYS[5], most, 'WITHVALUES')
  local seen = {}
  for i = 1, #pairs_, 2 do
    local deadline = redis.call('ZSCORE', KEYS[1], pairs_[i])
    if deadline and tonumber(deadline) > now then
      holders[#holders + 1] = pairs_[i]
      if not seen[pairs_[i + 1]] then
        seen[pairs_[i + 1]] = true
        tenants[#tenants + 1] = pairs_[i + 1]
      end
    end
  end
end

if task ~= '' then
  local offered = redis.call('ZSCORE', KEYS[4], task)
  if (not offered or tonumber(offered) <= now)
      and #redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, 1) > 0 then
    local names = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf', 'LIMIT', 0, 200)
    table.sort(names)
    local listed = {}
    for i = 1, math.min(20, #names) do listed[i] = names[i] end
    return answer('task', tenants, table.concat(listed, ','), 0)
  end
end

local claim_key = KEYS[6]
if mode == 'model' then
  local holder = first_usable(holders)
  if holder then return answer('queue', tenants, qprefix .. holder, 0) end
  if task == '' or #KEYS < 7 then return answer('model', tenants, '', 0) end
  local owner = redis.call('HGET', KEYS[6], 'owner')
  if not owner or (owner ~= ARGV[7] and owner ~= '*') then
    return answer('model', tenants, '', 0)  -- another tenant's spec: as if none
  end
  claim_key = KEYS[7]
else
  local server = first_usable(redis.call('SRANDMEMBER', KEYS[5], most))
  if server then return answer('queue', tenants, qprefix .. server, 0) end
end

local chosen = nil
local top = redis.call('ZREVRANGEBYSCORE', KEYS[3], '+inf', '(0', 'LIMIT', 0, most)
for _, name in ipairs(top) do
  if usable(name) then chosen = name break end
end
if not chosen then return answer('queue', tenants, shared, 0) end

local queue = qprefix .. chosen
for _ = 1, 3 do
  if redis.call('SET', claim_key, queue, 'NX', 'PX', claim_ms) then
    return answer('queue', tenants, queue, 1)
  end
  local claimed = redis.call('GET', claim_key)
  if claimed and string.sub(claimed, 1, #qprefix) == qprefix
      and usable(string.sub(claimed, #qprefix + 1)) then
    return answer('queue', tenants, claimed, 0)  -- an identical load is in flight there
  end
  redis.call('DEL', claim_key)  -- its worker is gone
end
return answer('queue', tenants, queue, 0)

-- Takes one waiting message off a queue's list the way kombu's consumer takes one
-- (worker/jobs/gather.py): off the list and into the unacked hash and its index in one
-- step, so the message is on a list or in the unacked hash at every moment. A worker
-- killed after this leaves it for the rescue sweep (worker/recovery/rescue.py) or kombu's
-- own restore, exactly as a message Celery delivered.
-- KEYS: the queue's list, the unacked hash, the unacked index
-- ARGV: the message as it lies on the list, its delivery tag, the unacked entry
--       (JSON [message, exchange, routing key]), the time taken (epoch seconds)
-- Returns 1 when taken, 0 when the message was no longer on the list.
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1

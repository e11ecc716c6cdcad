"""What `python -m bench.scale` reads and writes in Redis besides the real code paths.

The backlog (a million job records, written by one server-side loop from a real record),
Redis's own counters (bytes sent, CPU seconds), the watch on dead workers' queues, and the
check that every job the bench submitted ended in exactly one terminal record. Key names
come from tasks/state/keys.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from schemas import TERMINAL, JobRecord
from tasks.state.keys import Keys
from tasks.state.store import parse_events

ID, TENANT = "@@ID@@", "@@T@@"

BACKLOG_LUA = """
-- ARGV: first, count, record ttl, tenants, record JSON, job key, revision key, index key,
--       first score, revision (job key, index key and record hold the ID and T markers)
local first, count, tenants = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
for i = first, first + count - 1 do
  local id = string.format('%032x', i)
  local tenant = string.format('t%03d', i % tenants)
  local function fill(s) return (string.gsub(string.gsub(s, '@@ID@@', id), '@@T@@', tenant)) end
  redis.call('SET', fill(ARGV[6]), fill(ARGV[5]), 'EX', ARGV[3])
  redis.call('SET', fill(ARGV[7]), ARGV[10], 'EX', ARGV[3])
  redis.call('ZADD', fill(ARGV[8]), tonumber(ARGV[9]) + i, id)
end
return count
"""


def write_backlog(client: redis.Redis, keys: Keys, template: JobRecord, count: int, *,
                  ttl: int, tenants: int = 200, batch: int = 20_000) -> float:
    """Write `count` finished job records like `template` (a real one, its id and tenant
    replaced), each with its revision and its entry in its tenant's job index, as the
    store leaves a finished job (less its event streams); the seconds it took."""
    record = template.model_dump_json()
    record = record.replace(template.job_id, ID).replace(f'"tenant":"{template.tenant}"',
                                                         f'"tenant":"{TENANT}"')
    loop = client.register_script(BACKLOG_LUA)
    score = time.time() - 86_400
    started = time.perf_counter()
    for first in range(0, count, batch):
        loop(args=[first, min(batch, count - first), ttl, tenants, record, keys.job(ID),
                   keys.revision(ID), keys.jobs(TENANT), score, 5])
    return time.perf_counter() - started


@dataclass
class Counters:
    """Redis's own totals at one moment."""

    out_bytes: int
    cpu_seconds: float


def counters(client: redis.Redis) -> Counters:
    stats: dict[str, Any] = client.info("stats")
    cpu: dict[str, Any] = client.info("cpu")
    return Counters(int(stats["total_net_output_bytes"]),
                    float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))


def out_bytes(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


def terminal_check(client: redis.Redis, keys: Keys, job_ids: Sequence[str]) -> dict[str, Any]:
    """Each job's record, event stream and `done` stream: how many jobs do not have exactly
    one terminal record (a terminal status, one terminal event, one `done` entry)."""
    bad: list[dict[str, Any]] = []
    statuses: dict[str, int] = {}
    for start in range(0, len(job_ids), 200):
        chunk = job_ids[start:start + 200]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.get(keys.job(job_id))
            pipe.xrange(keys.events(job_id))
            pipe.xlen(keys.done(job_id))
        replies = pipe.execute()
        for i, job_id in enumerate(chunk):
            raw, entries, done = replies[3 * i:3 * i + 3]
            status = JobRecord.model_validate_json(raw).status.value if raw else "missing"
            statuses[status] = statuses.get(status, 0) + 1
            events = parse_events(job_id, [(keys.events(job_id), entries)])
            ends = sum(1 for _, event in events if event.status in TERMINAL)
            if ends != 1 or done != 1 or status not in {s.value for s in TERMINAL}:
                bad.append({"job_id": job_id, "status": status, "terminal_events": ends,
                            "done_entries": done})
    return {"jobs": len(job_ids), "bad": len(bad), "statuses": statuses, "examples": bad[:5]}


def wait_terminal(client: redis.Redis, keys: Keys, job_ids: Sequence[str],
                  timeout: float) -> int:
    """Wait until every job's record is terminal (or `timeout`); how many still are not."""
    deadline = time.monotonic() + timeout
    waiting = list(job_ids)
    while waiting and time.monotonic() < deadline:
        raws = client.mget([keys.job(j) for j in waiting])
        waiting = [j for j, raw in zip(waiting, raws, strict=True)
                   if raw is None or not JobRecord.model_validate_json(raw).terminal]
        if waiting:
            time.sleep(0.5)
    return len(waiting)


class ReapWatch(threading.Thread):
    """Seconds from each dead worker's last beat until its own queue is empty (its jobs moved
    to the shared queue: nothing else takes from a dead worker's queue)."""

    def __init__(self, client: redis.Redis, deaths: dict[str, float], timeout: float) -> None:
        super().__init__(daemon=True)
        self.redis, self.deaths, self.timeout = client, deaths, timeout
        self.seconds: dict[str, float] = {}

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while len(self.seconds) < len(self.deaths) and time.monotonic() < deadline:
            for queue, died in self.deaths.items():
                if queue not in self.seconds and not self.redis.llen(queue):
                    self.seconds[queue] = time.time() - died
            time.sleep(0.1)

"""Fair turns between tenants, chosen when a job is taken (no torch, no worker/).

In a multi-tenant pool each tenant has shares of each queue (`Keys.tenant_queues`: one list
per unit of its priority, of the shared queue and of each worker's own queue), and a
producer sends a job's message to one of its tenant's shares (tasks/tenants.py
`pick_queue`). A worker consumes two queues only, the shared one and its own, however many
tenants there are: messages reach those lists from the shares by turns
(tasks/state/lua/tenant_turns.lua), the oldest message of one share a turn, round robin over the
shares of that queue that hold messages (its ring, `Keys.turns`). So a flood from one
tenant does not hold back another's jobs, and priority P (P shares) gives P turns to
another's 1, as when every worker consumed every share and kombu rotated between them, but
without a BRPOP naming a list per tenant per unit of priority.

Turns are taken
- by the producer, right after it sends (`announce`): the share joins the ring, and a queue
  with nothing waiting is filled at once (an idle worker wakes);
- by the worker, as it takes a job (`Turns.take`): its queues are filled again, so the next
  job is waiting while this one runs;
- by the worker, at start and on each heartbeat (`Turns.sweep`): every share of its queues
  that holds messages joins the ring. That is how a message that reached a share with no
  announce gets its turns: put back by kombu or worker/recovery/rescue.py after its worker was lost,
  moved off a dead worker's shares by worker/recovery/reaper.py, retried by Celery, sent by a
  producer that does not announce, or sent while Redis lost the ring.

A queue's list holds at most DEPTH messages taken by turns (and any sent straight to it),
so a tenant arriving behind a flood waits for at most DEPTH of the flood's per queue.
Messages move whole between lists (LMOVE in Redis): delivery is kombu's, as before (its
unacked hash, the rescue sweeps), and a message keeps its routing key, the share it was
sent to, so it goes back there if it is restored. The rings are an index of that state,
rebuilt by the sweeps: losing one delays turns by a heartbeat, never loses a job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import redis

from tasks.state.keys import Keys, queue_list
from tasks.state.scripts import script
from tasks.tenants import Tenants

log = logging.getLogger(__name__)

DEPTH = 1
"""Messages a queue's list is filled to from its shares: one, the next job of the consumer
that asks; more would let a flood's messages wait in front of a newcomer's."""

RING_TTL_WORKER_TTLS = 10
"""The ring keys expire this many worker TTLs after their last turn (a gone worker's)."""


class Turns:
    """One worker's turns: its queues (the shared one, its own) and their tenant shares."""

    def __init__(self, client: redis.Redis, keys: Keys, shares: Mapping[str, Sequence[str]], *,
                 worker_ttl: float) -> None:
        self.redis = client
        self.shares = shares  # queue -> the tenant shares of it; empty: single-tenant
        self.worker_ttl = worker_ttl
        self._take = _layout(keys, {queue: () for queue in shares})  # built once: the names
        self._sweep = _layout(keys, shares)                          # don't change

    @classmethod
    def for_worker(cls, client: redis.Redis, keys: Keys, tenants: Tenants, own_queue: str, *,
                   worker_ttl: float) -> Turns:
        """The turns of a worker consuming the shared queue and `own_queue` (none without
        a tenants file: then there are no shares, and `take` and `sweep` do nothing)."""
        queues = (keys.queue(), own_queue) if tenants.multi else ()
        return cls(client, keys, {queue: [share for name, tenant in tenants.items()
                                          for share in keys.tenant_queues(name, tenant.priority,
                                                                          queue)]
                                  for queue in queues}, worker_ttl=worker_ttl)

    def take(self) -> int:
        """Fill the queues from their rings (a job was just taken); how many messages moved."""
        return self._turns(self._take, "fill the queues")

    def sweep(self) -> int:
        """Put every share that holds messages in its ring, then fill the queues."""
        return self._turns(self._sweep, "look for waiting tenant shares")

    def _turns(self, layout: tuple[list[str], list[int]], what: str) -> int:
        if not self.shares:
            return 0
        try:
            return _run(self.redis, layout, self.worker_ttl)
        except redis.RedisError as exc:  # the next sweep, a heartbeat later, takes them
            log.warning("could not %s by tenant turns: %s", what, exc)
            return 0


def announce(client: redis.Redis, keys: Keys, queue: str, share: str, *,
             worker_ttl: float) -> int:
    """After a send to `share` (a tenant's share of `queue`): the share joins the ring and an
    empty `queue` is filled. A failure is logged, not raised: the message is sent, and the
    workers' sweep gives it its turns within a heartbeat."""
    try:
        return _run(client, _layout(keys, {queue: (share,)}), worker_ttl)
    except redis.RedisError as exc:
        log.warning("sent to %s, but could not give it its turn now (the workers' next sweep "
                    "will): %s", share, exc)
        return 0


def _layout(keys: Keys, queues: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """tenant_turns.lua's KEYS for `queues` (each queue's list, ring, ring members, then the
    shares named for it) and the number of shares named for each."""
    names: list[str] = []
    for queue, shares in queues.items():
        names += [queue_list(queue), keys.turns(queue), keys.turn_members(queue),
                  *(queue_list(share) for share in shares)]
    return names, [len(shares) for shares in queues.values()]


def _run(client: redis.Redis, layout: tuple[list[str], list[int]], worker_ttl: float) -> int:
    """One script call: each queue's named shares that hold messages join its ring, then each
    queue is filled to DEPTH by turns; how many messages moved."""
    names, counts = layout
    ttl_ms = int(worker_ttl * RING_TTL_WORKER_TTLS * 1000)
    return int(script(client, "tenant_turns")(keys=names, args=[DEPTH, ttl_ms, *counts]))

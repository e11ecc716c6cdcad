"""The Redis key layout: the one module that knows modelq's key names (no torch).

Nothing else formats a key string. Celery's own broker keys (its queues' lists and its
unacked hash, named by the `Keys.*queue*` and `Keys.unacked*` methods, also under the
prefix) are laid out by kombu.
"""

from __future__ import annotations

SHARED_QUEUE = "modelq"
"""The shared queue under the default prefix (`Keys.queue`)."""


class Keys:
    """Key names under one prefix (Settings.key_prefix)."""

    def __init__(self, prefix: str = "modelq") -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        """String: the JobRecord as JSON."""
        return f"{self.prefix}:job:{job_id}"

    def revision(self, job_id: str) -> str:
        """String: the record's revision, an integer each write of the record increments
        (1: as submitted). Record scripts compare it instead of the record's bytes."""
        return f"{self.prefix}:job:{job_id}:revision"

    def events(self, job_id: str) -> str:
        """Stream: the job's Events, field 'event' holding JSON."""
        return f"{self.prefix}:job:{job_id}:events"

    def done(self, job_id: str) -> str:
        """Stream with one entry, added when the job ends: 'record', the terminal JobRecord JSON.

        `JobHandle.wait` blocks on it: one wake for the end, however many events came before.
        """
        return f"{self.prefix}:job:{job_id}:done"

    def cancel(self, job_id: str) -> str:
        """String: set when a cancel was asked for a job that may be running."""
        return f"{self.prefix}:job:{job_id}:cancel"

    def lease(self, job_id: str) -> str:
        """String with a TTL: 'worker:pid' of the process running the job, renewed by its heartbeat."""
        return f"{self.prefix}:job:{job_id}:lease"

    def worker(self, name: str) -> str:
        """String with a TTL: the worker's registry entry (WorkerInfo JSON). Written by its
        heartbeat when what it says changes; each beat only renews its TTL (PEXPIRE), so the
        TTL ends with the worker's deadline (`deadlines`)."""
        return f"{self.prefix}:worker:{name}"

    def deadlines(self) -> str:
        """Sorted set: worker name -> its heartbeat deadline (epoch ms, Redis's clock), set by
        each beat; live while the score is in the future. The reaper takes the dead ones from
        the bottom; a worker that stops scores 0, so its queues are drained on the next turn."""
        return f"{self.prefix}:workers:deadlines"

    def reaped(self) -> str:
        """Sorted set: name of a reaped worker -> until when (epoch ms) the reaper still drains
        its own queues, named by its memo: a message of it the broker puts back late (past
        its visibility timeout, or as it stopped) lands there after the reap."""
        return f"{self.prefix}:workers:reaped"

    def worker_routes(self, name: str) -> str:
        """String, no TTL: the worker's memo (JSON, tasks/state/index.py `Memo`) of the routing index
        entries it wrote and of its own queues with their shared destinations. Its heartbeat
        rewrites it with the entry; the reaper undoes and drains from it, then deletes it."""
        return f"{self.prefix}:worker:{name}:routes"

    def serving(self, request_key: str) -> str:
        """Set (routing index): names of the workers whose resident model serves loads with
        request key `request_key` (tasks.state.registry.request_key). Members may be dead: readers
        check `deadlines`."""
        return f"{self.prefix}:route:request:{request_key}"

    def holders(self, model_key: str) -> str:
        """Hash (routing index): worker name -> tenant of model `model_key` resident there."""
        return f"{self.prefix}:route:model:{model_key}"

    def free(self, task: str | None = None) -> str:
        """Sorted set (routing index): worker name -> free bytes, of every worker (`task` None)
        or of the workers that offer model task `task` (run jobs)."""
        return f"{self.prefix}:route:free" + ("" if task is None else f":task:{task}")

    def tasks_offered(self) -> str:
        """Sorted set (routing index): model task -> the latest deadline of a worker offering it
        (offered by a live worker while in the future; pruned by the reaper a day after)."""
        return f"{self.prefix}:route:tasks"

    def loading(self, request_key: str) -> str:
        """String with a TTL: the worker a load of `request_key` was sent to (one load per key)."""
        return f"{self.prefix}:loading:{request_key}"

    def model_spec(self, model_key: str) -> str:
        """Hash with a TTL: how model `model_key` was made, so that a run job naming it after
        its last holder died loads it again (tasks/state/model_specs.py). 'owner': its tenant ('*'
        for a shared base); 'load': the LoadJob JSON, as the worker placed it. Written by the
        worker that loads the model fresh; its TTL (Settings.record_ttl_seconds) renewed now
        and then while the model is used; deleted when `modelq unload` frees it."""
        return f"{self.prefix}:model:{model_key}:spec"

    def respawning(self, model_key: str) -> str:
        """String with a TTL: the worker queue that run jobs on lost model `model_key` (no live
        holder, a spec in `model_spec`) are sent to, so that it is loaded again once, there."""
        return f"{self.prefix}:respawning:{model_key}"

    def jobs(self, tenant: str) -> str:
        """Sorted set: a tenant's job ids by creation time."""
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def open_jobs(self, tenant: str) -> str:
        """Sorted set: a tenant's job ids not yet seen finished (quota counting; pruned lazily)."""
        return f"{self.prefix}:tenant:{tenant}:open"

    def tenant_limits(self, tenant: str) -> str:
        """String: the tenant's TenantLimits as JSON, published by workers from the tenants file."""
        return f"{self.prefix}:tenant:{tenant}:limits"

    def nonce(self, tenant: str, nonce: str) -> str:
        """String with a TTL until the envelope expires: the job id a signed nonce was used for."""
        return f"{self.prefix}:tenant:{tenant}:nonce:{nonce}"

    def unstarted(self) -> str:
        """Sorted set: ids of jobs written `queued`, scored by when they were last seen waiting
        (created, or found on a queue by the sweep); the sweep prunes the ones that started."""
        return f"{self.prefix}:unstarted"

    def dead_letters(self) -> str:
        """List: queue messages a worker could not decode, as JSON {queue, reason, message, at},
        newest first (worker/recovery/quarantine.py)."""
        return f"{self.prefix}:dead-letters"

    def unacked(self) -> str:
        """Hash (kombu's `unacked_key`, tasks/app.py): delivery tag -> JSON [message, exchange,
        routing key] of every message a worker of this deployment took and has not acked."""
        return f"{self.prefix}:unacked"

    def unacked_index(self) -> str:
        """Sorted set (kombu's `unacked_index_key`): delivery tag -> when it was taken (epoch s)."""
        return f"{self.prefix}:unacked:index"

    def unacked_mutex(self) -> str:
        """String with a TTL (kombu's `unacked_mutex_key`): held by the one worker of this
        deployment whose kombu restores messages past the visibility timeout."""
        return f"{self.prefix}:unacked:mutex"

    def unacked_pairs(self) -> list[tuple[str, str]]:
        """(hash, index) pairs the rescue sweeps: this deployment's, then kombu's global ones that
        earlier versions wrote (entries of this deployment's jobs only are ever restored)."""
        return [(self.unacked(), self.unacked_index()), (UNACKED_HASH, UNACKED_INDEX)]

    def reaper_turn(self) -> str:
        """String with a TTL: the worker whose heartbeat reaps this period (one per pool)."""
        return f"{self.prefix}:reaper:turn"

    # Celery's monitoring names. kombu builds its keys from them as `_kombu.binding.NAME`
    # (its own prefix, fixed: kombu's `global_keyprefix` would rename the task queues too),
    # so naming them after the prefix is as far under it as Celery allows.

    def control_exchange(self) -> str:
        """Celery's `control_exchange` (`celery inspect`, `celery control`, Flower).

        From it kombu keeps the set `_kombu.binding.PREFIX.pidbox` (each worker's mailbox,
        refreshed while it runs), broadcasts on the pub/sub channel `/DB.PREFIX.pidbox`
        (no key), and gets replies on the list `ID.reply.PREFIX.pidbox`, bound in
        `_kombu.binding.reply.PREFIX.pidbox` while the caller waits (both expire after it).
        """
        return self.prefix

    def event_exchange(self) -> str:
        """Celery's `event_exchange` and `event_queue_prefix` (`celery events`, Flower).

        Workers publish task and heartbeat events to it; each listener gets its own list
        `PREFIX.celeryev.ID` (bound in `_kombu.binding.PREFIX.celeryev`; Celery sets it to
        expire 60 s after its listener leaves). With no listener, an event is dropped.
        """
        return f"{self.prefix}.celeryev"

    # --- queue names: kombu's lists, under the prefix too, so pools can share one Redis ---

    def queue(self) -> str:
        """The queue every worker consumes; jobs go here when no worker is preferred
        (the prefix itself: `modelq` by default)."""
        return self.prefix

    def worker_queue(self, name: str) -> str:
        """The queue only worker `name` consumes (routing to where a model is resident)."""
        return f"{self.prefix}.worker.{name}"

    def queue_patterns(self) -> tuple[str, str]:
        """SCAN patterns of every queue list of this prefix: the shared one, then workers' own
        and tenant shares (`prefix.*`; never another prefix's, nor a `prefix:` key)."""
        return _glob_escape(self.prefix), f"{_glob_escape(self.prefix)}.*"

    def tenant_queues(self, tenant: str, priority: int = 1, base: str | None = None) -> list[str]:
        """A tenant's share of queue `base` (the shared one if None, or a worker's): one queue
        per unit of priority, so kombu's round-robin between queues weights the tenant's turns."""
        first = f"{base if base is not None else self.queue()}.tenant.{tenant}"
        return [first] + [f"{first}.{i}" for i in range(1, priority)]

    def turns(self, queue: str) -> str:
        """List with a TTL: the tenant shares of `queue` that hold messages, in turn order
        (tasks/state/turns.py; the right end has the next turn)."""
        return f"{self.prefix}:turns:{queue}"

    def turn_members(self, queue: str) -> str:
        """Set with a TTL: the shares in `turns(queue)`, so each is in it once."""
        return f"{self.prefix}:turns:{queue}:members"

    def orphan_destination(self, queue: str) -> tuple[str, str] | None:
        """(worker name, the same queue under the shared one) for a worker's own queue of this
        prefix, else None: `P.worker.W` maps to `P`, `P.worker.W.tenant.T[.i]` to `P.tenant.T[.i]`."""
        own = f"{self.prefix}.worker."
        if not queue.startswith(own):
            return None
        name, sep, rest = queue[len(own):].partition(".tenant.")
        return (name, self.queue() + (f".tenant.{rest}" if sep else "")) if name else None


def _glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def queue_list(queue: str) -> str:
    """List: kombu's Redis list holding `queue`'s waiting messages (its LLEN is the queue depth)."""
    return queue


UNACKED_HASH = "unacked"
"""Hash: kombu's own name for `Keys.unacked`, global (no prefix), which modelq used before the
unacked keys moved under the prefix. Nothing writes it now; the rescue still reads it
(`Keys.unacked_pairs`) so that a job taken by a worker of the earlier version is not lost."""

UNACKED_INDEX = "unacked_index"
"""Sorted set: kombu's own name for `Keys.unacked_index`, global; read as `UNACKED_HASH` is."""


DEFAULT_KEYS = Keys()
"""Names under the default prefix (tests and tools that speak of a default deployment)."""


def worker_queue(name: str) -> str:
    """`Keys.worker_queue` under the default prefix."""
    return DEFAULT_KEYS.worker_queue(name)


def tenant_queues(tenant: str, priority: int = 1, base: str = SHARED_QUEUE) -> list[str]:
    """`Keys.tenant_queues` (its result does not depend on the prefix: `base` names the queue)."""
    return DEFAULT_KEYS.tenant_queues(tenant, priority, base)

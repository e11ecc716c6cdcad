"""Load specs by model key: what lets a model key outlive the worker that held it (no torch).

A worker that loads a model fresh writes the load job that made it under its key
(`Keys.model_spec`: the owner tenant and the LoadJob, its placement as the worker resolved
it). When a run job names a key that no live worker holds, routing sends it on as a load
would go (tasks/state/lua/route.lua) and the worker that takes it loads the model again
from this spec (worker/handlers/respawn.py). Adapters attached to a private model later (attach jobs,
later loads of the key) are added to its spec, and one detached on purpose is dropped from
it. A shared base's spec has no adapters: they belong to tenants.

Cost stays flat per job: one HSET with its TTL per fresh load (and a read and a write per
attach), a TTL renewal at most every quarter TTL per model and worker (`touch`), a DEL when
`modelq unload` frees it from its last live holder, one HGETALL when a key must be loaded
again; nothing lists or scans specs. A spec nobody loads or uses for `ttl` seconds lapses
with its TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

from schemas import AdapterSpec, LoadJob
from schemas.text import MAX_ADAPTERS
from tasks.state.connection import text
from tasks.state.keys import Keys

log = logging.getLogger(__name__)

TOUCHED_MEMORY = 4096
"""Model keys whose last TTL renewal a process remembers (forgotten all at once beyond it)."""


class ModelSpecs:
    """Load specs by model key in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.keys = keys
        self.ttl = ttl
        self._clock = clock
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, model_key: str, owner: str, job: LoadJob) -> None:
        """Write how `model_key` was made (best effort: the load itself succeeded)."""
        key = self.keys.model_spec(model_key)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"owner": owner, "load": job.model_dump_json()})
                pipe.expire(key, self.ttl)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record the load spec of %s (%s): a run job naming it after "
                        "this worker dies will not find it", model_key, exc)
            return
        self._mark(model_key)

    def get(self, model_key: str) -> tuple[str, LoadJob] | None:
        """(owner tenant, load job) of `model_key`, or None when no spec is kept."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.model_spec(model_key)))
        if b"owner" not in raw or b"load" not in raw:
            return None
        return text(raw[b"owner"]), LoadJob.model_validate_json(raw[b"load"])

    def add_adapters(self, model_key: str, adapters: Sequence[AdapterSpec],
                     active: str | None = None) -> None:
        """Adapters attached to `model_key` after its load (an attach job, a later load of the
        same key): a load from the spec attaches them too (by name, once; `active` made the
        active one). Best effort."""
        def change(job: LoadJob) -> LoadJob:
            named = {a.name or "default" for a in job.adapters}
            more = [a for a in adapters if (a.name or "default") not in named]
            if len(job.adapters) + len(more) > MAX_ADAPTERS:
                log.warning("model %s: its spec holds %d adapters already; adapters attached "
                            "beyond %d are not loaded again with it", model_key,
                            len(job.adapters), MAX_ADAPTERS)
                return job
            return job.model_copy(update={"adapters": (*job.adapters, *more),
                                          "active_adapter": active or job.active_adapter})
        self._change(model_key, change)

    def drop_adapter(self, model_key: str, name: str) -> None:
        """An adapter detached on purpose: a load from the spec no longer attaches it."""
        def change(job: LoadJob) -> LoadJob:
            kept = tuple(a for a in job.adapters if (a.name or "default") != name)
            active = None if job.active_adapter == name else job.active_adapter
            return job.model_copy(update={"adapters": kept, "active_adapter": active})
        self._change(model_key, change)

    def _change(self, model_key: str, change: Callable[[LoadJob], LoadJob]) -> None:
        """Rewrite the spec's load job (if one is kept) by `change`, as one optimistic
        transaction (WATCH): two workers changing one key's spec never lose a change."""
        key = self.keys.model_spec(model_key)

        def apply(pipe: Any) -> None:
            raw = pipe.hget(key, "load")
            if raw is None:
                return
            job = LoadJob.model_validate_json(raw)
            new = change(job)
            if new != job:
                pipe.multi()
                pipe.hset(key, "load", new.model_dump_json())
        try:
            self.redis.transaction(apply, key)
        except (redis.RedisError, ValueError) as exc:
            log.warning("could not update the load spec of %s: %s", model_key, exc)

    def touch(self, model_key: str) -> None:
        """Renew the spec's TTL: the model is in use. At most one round trip per quarter TTL
        per model key in this process; best effort."""
        now = self._clock()
        with self._lock:
            last = self._touched.get(model_key)
            if last is not None and now - last < self.ttl / 4:
                return
        try:
            self.redis.expire(self.keys.model_spec(model_key), self.ttl)
        except redis.RedisError as exc:
            log.warning("could not renew the load spec of %s: %s", model_key, exc)
            return
        self._mark(model_key)

    def forget(self, model_key: str, worker: str = "") -> None:
        """Drop the spec: the model was unloaded on purpose from `worker`. Kept while another
        live worker still holds the key (its routing index names it), so that a run job on the
        key can still be loaded again if that holder dies. Best effort."""
        with self._lock:
            self._touched.pop(model_key, None)
        holders, spec = self.keys.holders(model_key), self.keys.model_spec(model_key)

        def apply(pipe: Any) -> None:
            names = {text(n) for n in cast(list[bytes], pipe.hkeys(holders))} - {worker}
            if names and any(cast(list[bytes | None],
                                  pipe.mget([self.keys.worker(n) for n in sorted(names)]))):
                return
            pipe.multi()
            pipe.delete(spec)
        try:
            self.redis.transaction(apply, holders, spec)
        except redis.RedisError as exc:
            log.warning("could not drop the load spec of %s: %s", model_key, exc)

    def _mark(self, model_key: str) -> None:
        with self._lock:
            if len(self._touched) >= TOUCHED_MEMORY:
                self._touched.clear()
            self._touched[model_key] = self._clock()

"""Load specs by model key (tasks/state/model_specs.py), the routing that falls back on them, and
the worker that loads a lost key from its spec (worker/handlers/respawn.py), against a real
Redis with no worker processes: a run job on a key no live worker holds goes where a load
would, and is loaded again there, when a spec of its tenant (or a shared one) is kept, and
stays ModelNotFound otherwise; specs cost a bounded number of round trips and no scans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from schemas import AttachAdapterJob, LoadJob, ModelNotFound, ModelRef, RunJob, UnloadJob
from tasks.state.keys import SHARED_QUEUE, Keys, worker_queue
from tasks.state.model_specs import ModelSpecs
from tasks.state.registry import Registry
from tasks.tenants import load_tenants
from tests.support.registry import KEY, Pool, resident
from tests.support.tenancy import write_tenants
from worker.device import WorkerIdentity
from worker.handlers import Handler, handler_table
from worker.jobs.progress import Reporter
from worker.models.admission import Admission
from worker.models.cache import ModelCache
from worker.models.residents import Residents
from worker.policy import TenantPolicy

KEYS = Keys()
LOAD = LoadJob(model=ModelRef(path="/m"), keep_alive_seconds=30)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _run(tenant: str = "default", task: str = "modelq.generate") -> RunJob:
    return RunJob.model_validate({"task": task, "model": {"model_key": KEY}, "tenant": tenant})


def test_a_spec_is_written_renewed_now_and_then_and_dropped(client: redis.Redis) -> None:
    clock = Clock()
    specs = ModelSpecs(client, KEYS, ttl=400, clock=clock)
    assert specs.get(KEY) is None
    specs.remember(KEY, "alice", LOAD)
    assert specs.get(KEY) == ("alice", LOAD)
    assert 0 < client.ttl(KEYS.model_spec(KEY)) <= 400
    client.expire(KEYS.model_spec(KEY), 50)
    clock.now += 99  # under a quarter TTL since it was written: no round trip
    specs.touch(KEY)
    assert client.ttl(KEYS.model_spec(KEY)) <= 50
    clock.now += 1
    specs.touch(KEY)
    assert client.ttl(KEYS.model_spec(KEY)) > 300
    specs.forget(KEY)
    assert specs.get(KEY) is None and not client.exists(KEYS.model_spec(KEY))


def test_a_run_on_a_lost_key_goes_where_a_load_would_once_and_to_one_worker(
        client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    specs = ModelSpecs(client, KEYS, ttl=600)
    tasks = ("modelq.generate",)
    pool.add("a", 10, (resident(LOAD),), tasks=tasks)
    pool.add("b", 50, tasks=tasks)
    pool.add("c", 40, tasks=tasks)
    assert registry.route(_run()) == worker_queue("a")  # held: its holder
    pool.kill("a")
    with pytest.raises(ModelNotFound, match="not resident"):
        registry.route(_run())  # no spec kept: as before
    specs.remember(KEY, "default", LOAD)
    assert registry.route(_run()) == worker_queue("b")  # the roomiest, as a load would go
    pool.change("c", 90)
    assert registry.route(_run()) == worker_queue("b")  # the respawn claim: loaded once, on b
    with pytest.raises(ModelNotFound):
        registry.route(UnloadJob(model_key=KEY))  # only run jobs load a lost key again
    pool.kill("b")  # b died before loading it: the claim is dropped, the next goes to c
    assert registry.route(_run()) == worker_queue("c")
    pool.kill("c")
    assert registry.route(_run()) == SHARED_QUEUE  # nobody live: it waits for a worker


def test_another_tenants_spec_is_as_good_as_none_and_a_shared_one_serves_all(
        client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    specs = ModelSpecs(client, KEYS, ttl=600)
    pool.add("b", 50, tasks=("modelq.generate",))
    specs.remember(KEY, "alice", LOAD)
    assert registry.route(_run("alice")) == worker_queue("b")
    with pytest.raises(ModelNotFound, match="not resident"):
        registry.route(_run("bob"))
    specs.remember(KEY, "*", LOAD)  # a shared base
    assert registry.route(_run("bob")) == worker_queue("b")


def test_routing_a_lost_key_scans_nothing(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    for i in range(50):
        pool.add(f"w{i:02d}", i, tasks=("modelq.generate",))
    ModelSpecs(client, KEYS, ttl=600).remember(KEY, "default", LOAD)
    stats = client.info("commandstats")
    scans = stats.get("cmdstat_scan", {}).get("calls", 0) + stats.get("cmdstat_keys", {}).get("calls", 0)
    assert registry.route(_run()) == worker_queue("w49")
    stats = client.info("commandstats")
    assert stats.get("cmdstat_scan", {}).get("calls", 0) + \
        stats.get("cmdstat_keys", {}).get("calls", 0) == scans


def _worker(client: redis.Redis, tenants_file: Path) -> tuple[dict[str, Handler], ModelCache]:
    """A multi-tenant worker's handlers in this process, its specs in the test's Redis."""
    cache = ModelCache(2**30)
    residents = Residents(cache, WorkerIdentity(name="w", device="cpu", local_device="cpu"),
                          TenantPolicy(load_tenants(tenants_file)))
    handlers = handler_table(residents, Admission(cache, "cpu"),
                             specs=ModelSpecs(client, KEYS, ttl=600))
    return dict(handlers), cache


def test_a_worker_loads_a_lost_key_from_its_spec_with_its_adapters_for_its_tenant_only(
        client: redis.Redis, models: dict[str, Path], tmp_path: Path) -> None:
    tenants = write_tenants(tmp_path / "tenants.toml", {
        t: {"key": t * 8, "roots": [str(models["llama"].parent)]} for t in ("alice", "bob")})
    reporter = Reporter(lambda *_: None, lambda: False)
    dead, _ = _worker(client, tenants)
    load = LoadJob.model_validate({"model": str(models["llama"]), "tenant": "alice", "pin": True,
                                   "adapters": [{"ref": str(models["lora"]), "name": "a"}]})
    key = dead["load"].run(load, reporter).model_key
    owner, spec = ModelSpecs(client, KEYS, ttl=600).get(key)  # type: ignore[misc]
    assert owner == "alice" and spec.model == load.model and spec.adapters == load.adapters

    def run(handlers: dict[str, Handler], tenant: str) -> Any:
        job = RunJob.model_validate({"task": "modelq.generate", "model": {"model_key": key},
                                     "tenant": tenant, "adapters": ["a"],
                                     "kwargs": {"prompts": "the quick", "max_new_tokens": 3}})
        return handlers["run"].run(job, reporter)

    expected = run(dead, "alice")
    dead["attach"].run(AttachAdapterJob(model_key=key, adapter=str(models["lora2"]), name="b",
                                        tenant="alice"), reporter)  # kept with the spec too
    survivor, cache = _worker(client, tenants)  # another worker: the model is not resident there
    with pytest.raises(ModelNotFound, match="not resident"):
        run(survivor, "bob")  # alice's spec is not bob's: nothing is loaded
    assert cache.entries() == []
    result = run(survivor, "alice")
    assert result.cache_hit is False and result.model_key == key and result.value == expected.value
    entry = cache.peek(key)
    assert entry is not None and entry.pinned and entry.tenant == "alice"
    assert set(entry.adapters) == {"a@alice", "b@alice"} and entry.info.active_adapters == ("b@alice",)
    survivor["unload"].run(UnloadJob(model_key=key, adapter="b", tenant="alice"), reporter)
    assert [a.name for a in ModelSpecs(client, KEYS, ttl=600).get(key)[1].adapters] == ["a"]  # type: ignore[index]
    survivor["unload"].run(UnloadJob(model_key=key, tenant="alice"), reporter)
    assert ModelSpecs(client, KEYS, ttl=600).get(key) is None  # unloaded on purpose: forgotten
    with pytest.raises(ModelNotFound):
        run(survivor, "alice")


def test_unload_keeps_the_spec_while_another_live_worker_holds_the_key(client: redis.Redis) -> None:
    specs = ModelSpecs(client, KEYS, ttl=600)
    specs.remember(KEY, "alice", LOAD)
    client.hset(KEYS.holders(KEY), mapping={"w": "alice", "gone": "alice"})  # w unloads; gone died
    specs.forget(KEY, "w")
    assert specs.get(KEY) is None  # no other live holder: unloaded on purpose, forgotten
    specs.remember(KEY, "alice", LOAD)
    client.set(KEYS.worker("other"), b"{}")
    client.hset(KEYS.holders(KEY), "other", "alice")
    specs.forget(KEY, "w")
    assert specs.get(KEY) == ("alice", LOAD)  # "other" still serves it: if it dies, it respawns
    client.delete(KEYS.worker("other"))
    specs.forget(KEY, "w")
    assert specs.get(KEY) is None

"""Issue 2 end to end: one real `modelq worker` serves every job of this module.

A module-scoped redis-server (the session one is flushed per test) and one worker
started with an offline hub cache; jobs go in through the public Client and the CLI
(`python -m tasks.cli`), and the assertions are on what a user sees: records,
events, exit codes and printed output.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import AttachAdapterJob, JobRecord, JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client
from tasks.settings import Settings
from tests.support.models import (
    build_hub_cache,
    build_model,
    build_pickle_only_model,
    build_remote_code_model,
    build_unknown_arch,
)
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WAIT = 120
LLAMA_QUANTIZED = 14  # 2 layers x 7 projections; lm_head stays in full precision


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("hub")
    old = build_hub_cache(cache, "org/tiny-llama", models["llama"], revision_commit="b" * 40, branch="v1")
    new = build_hub_cache(cache, "org/tiny-llama", build_model("llama", cache.parent / "llama-v2", seed=9))
    return {"cache": str(cache), "old": old, "new": new}


@pytest.fixture(scope="module")
def pool(server: RedisServer, hub: dict[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    workers = WorkerPool(server.url, tmp_path_factory.mktemp("logs"))
    workers.start("core", env={"HF_HUB_CACHE": hub["cache"], "HF_HUB_OFFLINE": "1"})
    yield workers
    workers.stop_all()


@pytest.fixture(scope="module")
def client(server: RedisServer, pool: WorkerPool) -> Client:
    return Client(Settings(redis_url=server.url, connect_timeout_seconds=2))


def cli(server: RedisServer, *args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELQ_REDIS_URL": server.url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def load(client: Client, model: str | dict[str, object], **fields: object) -> JobRecord:
    return client.submit(LoadJob.model_validate({"model": model, **fields})).wait(timeout=WAIT)


def succeeded(record: JobRecord) -> JobRecord:
    assert record.status is JobStatus.succeeded, record.error
    assert record.result is not None
    return record


@pytest.mark.parametrize("kind, model_class", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                               ("mistral", "MistralForCausalLM")])
def test_plain_loads(client: Client, models: dict[str, Path], kind: str, model_class: str) -> None:
    handle = client.submit(LoadJob(model=str(models[kind]), dtype="bfloat16"))
    record = succeeded(handle.wait(timeout=WAIT))
    info = record.result
    assert info is not None and info.model_class == model_class
    assert info.base_model.path == str(models[kind]) and info.base_model.revision is None
    assert info.base_model.fingerprint and info.dtype == "bfloat16" and info.quantization == "none"
    assert info.quantized_modules == 0 and info.device_map == {"": "cpu"} and info.num_parameters > 0
    assert (record.worker, record.device, record.attempt) == ("core", "cpu", 1)
    events = list(handle.events(timeout=5))
    stages = [e.stage for e in events if e.stage is not None]
    assert stages[0] is Stage.resolving and Stage.loading in stages
    assert any(e.stage is Stage.loading and e.progress and e.progress.fraction == 1.0 for e in events)
    assert events[-1].status is JobStatus.succeeded


def test_quantized_loads_hold_bnb_layers_and_are_smaller(client: Client, models: dict[str, Path]) -> None:
    handles = {method: client.submit(LoadJob(model=str(models["llama"]), dtype="bfloat16",
                                             quantization=method))
               for method in ("none", "int8", "nf4", "fp4")}
    infos = {m: succeeded(h.wait(timeout=WAIT)).result for m, h in handles.items()}
    plain = infos.pop("none")
    assert plain is not None
    for method, info in infos.items():
        assert info is not None and info.quantization == method
        assert info.quantized_modules == LLAMA_QUANTIZED
        assert info.footprint_bytes < plain.footprint_bytes
        assert info.num_parameters == plain.num_parameters
    assert len({i.model_key for i in infos.values() if i is not None} | {plain.model_key}) == 4


def test_adapter_folder_loads_its_base_then_attaches_it(client: Client, models: dict[str, Path]) -> None:
    info = succeeded(load(client, str(models["qwen_lora"]))).result
    assert info is not None and info.model_class == "Qwen2ForCausalLM"
    assert info.base_model.path == str(models["qwen2"])
    assert info.adapters == ("default",) and info.active_adapters == ("default",)


def test_two_adapters_on_one_resident_model_switched_by_jobs(client: Client, server: RedisServer,
                                                             models: dict[str, Path]) -> None:
    first = succeeded(load(client, str(models["llama"]), dtype="float32",
                           adapters=[{"ref": str(models["lora"]), "name": "a"},
                                     {"ref": str(models["lora2"]), "name": "b"}], active_adapter="a"))
    info = first.result
    assert info is not None and info.adapters == ("a", "b") and info.active_adapters == ("a",)

    done = cli(server, "attach", info.model_key, str(models["lora2"]), "--name", "b", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    switched = JobRecord.model_validate_json(done.stdout).result
    assert switched is not None and switched.model_key == info.model_key and switched.cache_hit
    assert switched.adapters == ("a", "b") and switched.active_adapters == ("b",)

    back = succeeded(client.submit(AttachAdapterJob(model_key=info.model_key, adapter=str(models["lora"]),
                                                    name="a")).wait(timeout=WAIT)).result
    assert back is not None and back.active_adapters == ("a",)
    again = succeeded(load(client, str(models["llama"]), dtype="float32",
                           adapters=[{"ref": str(models["lora"]), "name": "a"},
                                     {"ref": str(models["lora2"]), "name": "b"}], active_adapter="b")).result
    assert again is not None and again.cache_hit and again.model_key == info.model_key
    assert again.active_adapters == ("b",) and again.adapters == ("a", "b")


def test_hub_ids_load_offline_at_their_commit(client: Client, hub: dict[str, str]) -> None:
    latest = succeeded(load(client, "org/tiny-llama")).result
    assert latest is not None and latest.base_model.revision == hub["new"]
    assert latest.base_model.ref == "org/tiny-llama" and latest.base_model.path.endswith(hub["new"])
    for revision in ("v1", hub["old"]):
        pinned = succeeded(load(client, {"repo_id": "org/tiny-llama", "revision": revision})).result
        assert pinned is not None and pinned.base_model.revision == hub["old"]
        assert pinned.model_key != latest.model_key


def _bad_folders(models: dict[str, Path], root: Path) -> dict[str, Path]:
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((models["llama"] / "config.json").read_text())
    odd_targets = root / "odd-targets"
    odd_targets.mkdir()
    config = json.loads((models["lora"] / "adapter_config.json").read_text())
    (odd_targets / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    (odd_targets / "adapter_model.safetensors").write_bytes(
        (models["lora"] / "adapter_model.safetensors").read_bytes())
    return {"no_weights": no_weights, "odd_targets": odd_targets,
            "pickle": build_pickle_only_model(root / "pickle"),
            "unknown": build_unknown_arch(root / "unknown"),
            "remote": build_remote_code_model(root / "remote", root / "marker")}


def test_every_refusal_fails_its_job_and_the_worker_serves_on(client: Client, models: dict[str, Path],
                                                               pool: WorkerPool, tmp_path: Path) -> None:
    bad = _bad_folders(models, tmp_path)
    llama, qwen_lora = str(models["llama"]), str(models["qwen_lora"])
    cases: list[tuple[str, str, dict[str, object]]] = [
        ("ModelNotFound", "is not a model folder", {"model": str(tmp_path / "absent")}),
        ("ModelNotFound", "org/absent", {"model": "org/absent"}),
        ("ModelNotFound", "org/tiny-llama@nope",
         {"model": {"repo_id": "org/tiny-llama", "revision": "nope"}}),
        ("ModelNotFound", "no weights", {"model": str(bad["no_weights"])}),
        ("UnsafeWeights", "safetensors", {"model": str(bad["pickle"])}),
        ("UnsupportedModel", "not_a_real_arch", {"model": str(bad["unknown"])}),
        ("AdapterIncompatible", "trained on", {"model": llama, "adapters": [qwen_lora]}),
        ("AdapterIncompatible", "does not have", {"model": llama, "adapters": [str(bad["odd_targets"])]}),
        ("RemoteCodeNotAllowed", "trust_remote_code", {"model": str(bad["remote"])}),
    ]
    handles = [client.submit(LoadJob.model_validate(job)) for _, _, job in cases]
    resident = succeeded(load(client, llama, dtype="float32")).result
    assert resident is not None
    attach = client.submit(AttachAdapterJob(model_key=resident.model_key, adapter=qwen_lora, name="q"))
    after = succeeded(load(client, str(models["mistral"]), dtype="float32"))  # still serving

    for (error_type, says, _), handle in zip(cases, handles, strict=True):
        record = handle.wait(timeout=WAIT)
        assert record.status is JobStatus.failed and record.error is not None, record
        assert (record.error.type, record.error.retryable) == (error_type, False), record.error
        assert says in record.error.message and record.result is None
    failed_attach = attach.wait(timeout=WAIT)
    assert failed_attach.error is not None and failed_attach.error.type == "AdapterIncompatible"
    assert not (tmp_path / "marker").exists()
    assert after.attempt == 1 and all(w.alive() for w in pool)
    # the failed jobs left the resident model as it was
    state = succeeded(load(client, llama, dtype="float32")).result
    assert state is not None and state.cache_hit and state.adapters == resident.adapters
    assert "q" not in state.adapters


def _unblock(fifo: Path, deadline: float) -> None:
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: the worker has not opened it yet
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        os.write(fd, b"not json")
        os.close(fd)
        return


def test_cancel_while_the_worker_is_busy(client: Client, models: dict[str, Path], tmp_path: Path) -> None:
    """The busy job blocks reading a FIFO adapter config until the test writes to it."""
    stuck = tmp_path / "stuck-adapter"
    stuck.mkdir()
    os.mkfifo(stuck / "adapter_config.json")
    busy = client.submit(LoadJob.model_validate({"model": str(models["llama"]), "dtype": "float32",
                                                 "adapters": [str(stuck)]}))
    deadline = time.monotonic() + WAIT
    while busy.status().stage is not Stage.attaching:
        assert time.monotonic() < deadline and not busy.status().terminal
        time.sleep(0.05)
    queued = client.submit(LoadJob(model=str(models["mistral"])))
    cancelled = queued.cancel()
    assert cancelled.status is JobStatus.cancelled
    _unblock(stuck / "adapter_config.json", time.monotonic() + WAIT)

    assert busy.wait(timeout=WAIT).status is JobStatus.failed
    succeeded(load(client, str(models["qwen2"])))  # queued after the cancelled one: it was skipped
    assert queued.status() == cancelled
    assert cancelled.attempt == 0 and cancelled.worker is None and cancelled.started_at is None


def test_cli_watch_follows_a_job_to_its_end(client: Client, server: RedisServer,
                                            models: dict[str, Path]) -> None:
    handle = client.submit(LoadJob(model=str(models["mistral"]), dtype="float16"))
    done = cli(server, "watch", handle.job_id)
    assert done.returncode == 0, done.stderr
    for shown in ("resolving", "loading", "succeeded", "MistralForCausalLM", handle.job_id):
        assert shown in done.stdout


def test_cli_load_nf4_with_adapter_prints_the_record_and_exit_codes(server: RedisServer,
                                                                   models: dict[str, Path]) -> None:
    done = cli(server, "load", str(models["llama"]), "--quant", "nf4", "--adapter", str(models["lora"]),
               "--wait", "--json")
    assert done.returncode == 0, done.stderr
    record = JobRecord.model_validate_json(done.stdout)
    assert record.status is JobStatus.succeeded and record.result is not None
    assert record.result.quantization == "nf4" and record.result.quantized_modules == LLAMA_QUANTIZED
    assert record.result.adapters == ("default",)
    assert record.job == LoadJob(model=ModelRef(path=str(models["llama"])), quantization="nf4",
                                 adapters=[str(models["lora"])])

    failed = cli(server, "load", "/no/such/model", "--wait")
    assert failed.returncode == 1 and "ModelNotFound" in failed.stdout
    status = cli(server, "status", record.job_id, "--json")
    assert status.returncode == 0 and JobRecord.model_validate_json(status.stdout) == record

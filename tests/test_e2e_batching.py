"""Cross-job batches end to end: real Redis, real `modelq worker` processes, default settings.

Queued one-prompt `modelq.generate` jobs on one model share calls (mixed adapters in one
call through peft's `adapter_names=`), and each result equals the same prompt generated
alone in process with its own adapter (float32, greedy). A bad job fails alone; a worker
killed mid-batch has every job of it finished once, on the other worker.
"""

from __future__ import annotations

import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas import AdapterSpec, JobRecord, JobStatus, LoadJob, ModelInfo, ModelRef, RunResult
from tasks.client import Client, JobHandle
from tests.support.models import TOKENIZER_LINES, build_hub_cache
from tests.support.tenancy import copy_into, tenant_client, write_tenants
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e
TOKENS = 8
WORDS = " ".join(TOKENIZER_LINES).split()
PROMPTS = [" ".join(WORDS[i:i + 2 + i % 5]) for i in range(40)]
ADAPTERS: list[str | None] = [None, "a", "b"]  # None: the base alone
ON_DISK = {"a": "lora", "b": "lora2"}


def _load(models: dict[str, Path]) -> LoadJob:
    return LoadJob.model_validate({"model": str(models["llama"]), "adapters": [
        {"ref": str(models["lora"]), "name": "a"}, {"ref": str(models["lora2"]), "name": "b"}]})


class Reference(dict[tuple[str, str | None], str]):
    """prompt, adapter -> the prompt generated alone in process with that adapter (or none),
    each generated when first asked for."""

    def __init__(self, models: dict[str, Path]) -> None:
        super().__init__()
        self.folders = models
        self.tokenizer = AutoTokenizer.from_pretrained(models["llama"])
        self.models: dict[str | None, Any] = {}

    def __missing__(self, key: tuple[str, str | None]) -> str:
        prompt, adapter = key
        if adapter not in self.models:
            model: Any = AutoModelForCausalLM.from_pretrained(self.folders["llama"]).eval()
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(self.folders[ON_DISK[adapter]]))
            self.models[adapter] = model.eval()
        encoded = self.tokenizer(prompt, return_tensors="pt")
        out = self.models[adapter].generate(**encoded, max_new_tokens=TOKENS, do_sample=False,
                                            pad_token_id=self.tokenizer.pad_token_id)
        self[key] = str(self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:],
                                              skip_special_tokens=True))
        return self[key]


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> Reference:
    return Reference(models)


def _submit(client: Client, model: str | LoadJob, prompt: Any, adapter: str | None) -> JobHandle:
    return client.run("modelq.generate", model=model, adapters=[] if adapter is None else [adapter],
                      args=[prompt], kwargs={"max_new_tokens": TOKENS})


def _result(record: JobRecord) -> RunResult:
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, RunResult)
    return record.result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _batch_sizes(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {s.labels.get("le", s.name): s.value for family in text_string_to_metric_families(text)
            if family.name == "modelq_batch_jobs" for s in family.samples}


def test_mixed_adapter_batches_match_unbatched_generation(client: Client, pool: WorkerPool,
                                                          models: dict[str, Path],
                                                          reference: Any) -> None:
    port = _free_port()
    pool.start("batcher", "--metrics-port", str(port))
    loaded = client.submit(_load(models)).wait(timeout=120).result
    assert isinstance(loaded, ModelInfo) and loaded.active_adapters == ("b",)
    key = loaded.model_key
    asked = [(PROMPTS[i], ADAPTERS[i % 3]) for i in range(32)]
    handles = [_submit(client, key, prompt, adapter) for prompt, adapter in asked]
    results = [_result(h.wait(timeout=120)) for h in handles]
    for (prompt, adapter), result in zip(asked, results, strict=True):
        assert result.value == [reference[prompt, adapter]], (prompt, adapter)
        # the adapters active for the call, not the model's own ('b') put back after it
        assert result.model.active_adapters == (() if adapter is None else (adapter,))
    assert max(r.batch_jobs for r in results) > 1, [r.batch_jobs for r in results]
    sizes = _batch_sizes(port)
    assert sizes["modelq_batch_jobs_count"] >= 1 and sizes["1.0"] < sizes["modelq_batch_jobs_count"]

    # --- a bad job inside a batch fails alone, with its own error ----------------------
    good = [(PROMPTS[i], ADAPTERS[i % 3]) for i in range(32, 40)]
    handles = [_submit(client, key, p, a) for p, a in good[:4]]
    not_text = _submit(client, key, [123], "a")  # the shared call raises: one by one
    no_adapter = _submit(client, key, PROMPTS[0], "nope")  # fails before any call
    handles += [_submit(client, key, p, a) for p, a in good[4:]]
    for (prompt, adapter), handle in zip(good, handles, strict=True):
        assert _result(handle.wait(timeout=120)).value == [reference[prompt, adapter]]
    for handle, words in ((not_text, "list of strings"), (no_adapter, "'nope'")):
        record = handle.wait(timeout=120)
        assert record.status is JobStatus.failed and record.error is not None
        assert record.error.type == "InvalidJob" and words in record.error.message, record.error
    assert "'a'" in str(no_adapter.wait(timeout=5).error)  # what the model has


def _wait_until(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _terminal_events(handle: JobHandle) -> Iterator[str]:
    for event in handle.events(timeout=10):
        if event.status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
            yield event.status.value


SLOW_TASKS = textwrap.dedent('''
    import os
    import time

    from tasks import logs
    from worker import TaskContext, model_task

    @model_task("acme.slow_echo", batchable=True)
    def slow_echo(ctx: TaskContext, items: list[str], log: str, seconds: float = 3.0) -> list[str]:
        """Echo each item after `seconds` (checking for cancels), noting each one done."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctx.check_cancel()
            time.sleep(0.05)
        with open(log, "a") as out:
            out.write("".join(f"{item} {os.getpid()}\\n" for item in items))
        with open(log + ".context", "a") as out:  # the job ids this call's log lines carry
            out.write(logs.context().get("job_id", "") + "\\n")
        return [item.upper() for item in items]
''')


def test_a_worker_killed_mid_batch_has_every_job_finished_once_elsewhere(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "acme_batch.py").write_text(SLOW_TASKS)
    env = {"PYTHONPATH": str(tmp_path)}
    first = pool.start("first", "--tasks", "acme_batch", env=env)
    spec = LoadJob(model=str(models["llama"]))
    assert client.submit(spec).wait(timeout=120).worker == "first"
    other = pool.start("other", "--tasks", "acme_batch", env=env)
    done = tmp_path / "done.txt"
    jobs = [client.run("acme.slow_echo", model=spec, args=[[f"item{i}"]],
                       kwargs={"log": str(done)}) for i in range(12)]
    _wait_until(lambda: sum(client.status(h.job_id).status is JobStatus.running
                            for h in jobs) > 1)
    time.sleep(0.5)  # mid-call: the batch's call sleeps 3 s
    running = {h.job_id for h in jobs if client.status(h.job_id).status is JobStatus.running}
    first.kill()
    records = [h.wait(timeout=120) for h in jobs]
    for i, (handle, record) in enumerate(zip(jobs, records, strict=True)):
        assert _result(record).value == [f"ITEM{i}"] and record.worker == other.name
        assert record.attempt == (2 if handle.job_id in running else 1), record
        assert list(_terminal_events(handle)) == ["succeeded"]
    lines = done.read_text().split()
    assert sorted(lines[0::2]) == sorted(f"item{i}" for i in range(12))  # each done once
    assert set(lines[1::2]) == {str(other.pid)}
    assert len(running) > 1 and any(_result(r).batch_jobs > 1 for r in records)


def test_queued_jobs_share_a_call_however_they_name_the_model_and_keep_their_seeded_samples(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "acme_batch.py").write_text(SLOW_TASKS)
    pool.start("mixer", "--tasks", "acme_batch", env={"PYTHONPATH": str(tmp_path)})
    spec = LoadJob(model=str(models["llama"]))
    key = _loaded_key(client.submit(spec).wait(timeout=120))
    log = str(tmp_path / "done.txt")
    blocker = client.run("acme.slow_echo", model=key, args=[["block"]], kwargs={"log": log, "seconds": 2.0})
    _wait_until(lambda: client.status(blocker.job_id).status is JobStatus.running)
    jobs = [client.run("acme.slow_echo", model=key if i % 2 else spec, args=[[f"item{i}"]],
                       kwargs={"log": log, "seconds": 0.1}) for i in range(12)]  # queued meanwhile
    assert _result(blocker.wait(timeout=60)).value == ["BLOCK"]
    results = [_result(h.wait(timeout=120)) for h in jobs]
    assert [r.value for r in results] == [[f"ITEM{i}"] for i in range(12)]
    assert all(r.model_key == key for r in results)
    # six name the key, six the spec: a call of more than six had both kinds
    assert max(r.batch_jobs for r in results) > 6, [r.batch_jobs for r in results]
    contexts = [set(line.split(",")) for line in Path(log + ".context").read_text().split()]
    assert {blocker.job_id} in contexts  # a lone job's lines name it, a shared call's name them all
    biggest = max(contexts, key=len)
    assert biggest <= {h.job_id for h in jobs} and len(biggest) == max(r.batch_jobs for r in results)

    # the same prompt and seed in four jobs sharing a call: each samples as a lone job does
    sampled = {"max_new_tokens": TOKENS, "do_sample": True, "temperature": 1.5, "seed": 3}
    blocker = client.run("acme.slow_echo", model=key, args=[["block"]], kwargs={"log": log, "seconds": 2.0})
    _wait_until(lambda: client.status(blocker.job_id).status is JobStatus.running)
    handles = [client.run("modelq.generate", model=key if i % 2 else spec, args=[PROMPTS[0]],
                          kwargs=sampled) for i in range(4)]
    shared = [_result(h.wait(timeout=120)) for h in handles]
    lone = _result(client.run("modelq.generate", model=key, args=[PROMPTS[0]],
                              kwargs=sampled).wait(timeout=60))
    assert [r.batch_jobs for r in shared] == [4] * 4 and lone.batch_jobs == 1
    assert [r.value for r in shared] == [lone.value] * 4


def _loaded_key(record: JobRecord) -> str:
    assert record.status is JobStatus.succeeded and isinstance(record.result, ModelInfo), record.error
    return record.result.model_key


def test_tenants_rows_in_a_mixed_batch_see_only_their_own_adapters(
        client: Client, pool: WorkerPool, settings: Any, models: dict[str, Path],
        reference: Any, tmp_path: Path) -> None:
    keys = {t: f"batch-key-{t}-0123456789abcdef" for t in ("alice", "bob")}
    for name, adapter in (("alice", "lora"), ("bob", "lora2")):
        copy_into(models[adapter], tmp_path / name / "adapter")
    commit = build_hub_cache(tmp_path / "hub", "org/tiny", models["llama"])
    tenants = write_tenants(tmp_path / "tenants.toml", {
        t: {"key": k, "roots": [str(tmp_path / t)]} for t, k in keys.items()})
    pool.start("shared", env={"MODELQ_TENANTS_FILE": str(tenants),
                              "HF_HUB_CACHE": str(tmp_path / "hub")})
    alice, bob = (tenant_client(settings, t, keys[t]) for t in ("alice", "bob"))
    base = ModelRef(repo_id="org/tiny", revision=commit)
    key = ""
    for producer in (bob, alice):  # alice last: her adapter is the model's active one
        spec = LoadJob(model=base, adapters=(AdapterSpec.model_validate({"ref": str(
            tmp_path / str(producer.settings.tenant) / "adapter")}),))
        loaded = producer.submit(spec).wait(timeout=120).result
        assert isinstance(loaded, ModelInfo)
        key = loaded.model_key
    asked = [(alice, ["default"], "a"), (bob, ["default"], "b"), (bob, None, None),
             (alice, None, "a"), (bob, [], None)] * 4
    handles = [producer.run("modelq.generate", model=key, adapters=adapters, args=[PROMPTS[i]],
                            kwargs={"max_new_tokens": TOKENS})
               for i, (producer, adapters, _) in enumerate(asked)]
    refused = bob.run("modelq.generate", model=key, adapters=["default", "mine"],
                      args=[PROMPTS[0]], kwargs={"max_new_tokens": TOKENS})
    results = [_result(h.wait(timeout=120)) for h in handles]
    for i, ((_, _, expected), result) in enumerate(zip(asked, results, strict=True)):
        assert result.value == [reference[PROMPTS[i], expected]], (i, expected)
        assert result.model.active_adapters == (() if expected is None else ("default",))
        assert result.model.adapters == ("default",)  # its own, by its plain name
    assert max(r.batch_jobs for r in results) > 1
    record = refused.wait(timeout=60)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "InvalidJob" and "'mine'" in record.error.message
    assert "alice" not in record.error.message and "@" not in record.error.message

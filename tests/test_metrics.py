"""A worker's Prometheus endpoint scraped and parsed; JSON log lines carry job id, tenant, worker."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import AdapterSpec, JobRecord, JobStatus, LoadJob, ModelRef, QuantizationSpec
from tasks import logs
from tasks.client import Client
from tests.support.workers import WorkerPool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.e2e
def test_worker_metrics_and_json_logs(client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    port = _free_port()
    worker = pool.start("m1", "--metrics-port", str(port), env={"MODELQ_LOG_JSON": "1"})
    before = scrape(port)
    assert before[("modelq_jobs_total", (("kind", "load"), ("status", "succeeded")))] == 0
    assert before[("modelq_resident_bytes", (("device", "cpu"),))] == 0
    assert before[("modelq_queue_depth", (("queue", "modelq"),))] == 0
    assert before[("modelq_queue_depth", (("queue", "modelq.worker.m1"),))] == 0

    job = LoadJob(model=ModelRef(path=str(models["llama"])), quantization=QuantizationSpec(method="nf4"),
                  tenant="acme")
    first = client.submit(job).wait(timeout=120)
    again = client.submit(job).wait(timeout=120)
    bad = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])),
                                adapters=(AdapterSpec(ref=str(models["qwen_lora"])),))).wait(timeout=120)
    assert (first.status, again.status, bad.status) == (JobStatus.succeeded, JobStatus.succeeded,
                                                        JobStatus.failed)
    assert first.result is not None

    after = scrape(port)
    assert after[("modelq_jobs_total", (("kind", "load"), ("status", "succeeded")))] == 2
    assert after[("modelq_jobs_total", (("kind", "load"), ("status", "failed")))] == 1
    assert after[("modelq_cache_hits_total", ())] == 1
    assert after[("modelq_cache_misses_total", ())] == 1
    assert after[("modelq_loaded_bytes_total", (("device", "cpu"),))] == first.result.footprint_bytes
    assert after[("modelq_load_duration_seconds_count", (("quantization", "nf4"),))] == 1
    assert after[("modelq_load_duration_seconds_sum", (("quantization", "nf4"),))] > 0
    assert after[("modelq_resident_bytes", (("device", "cpu"),))] == first.result.footprint_bytes
    assert after[("modelq_resident_models", (("device", "cpu"),))] == 1
    assert after[("modelq_cache_evictions_total", (("device", "cpu"),))] == 0

    lines = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    done = [line for line in lines if line.get("job_id") == first.job_id and "succeeded" in line["message"]]
    assert done and done[0]["tenant"] == "acme" and done[0]["worker"] == "m1"
    assert done[0]["level"] == "INFO" and done[0]["logger"] == "worker.jobs.attempt"


def test_json_formatter_carries_extra_and_context(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(logging.INFO, as_json=True)
    try:
        logs.set_worker("w9")
        ctx = logs.JobContext()
        record = JobRecord.model_validate({
            "job_id": "j1", "kind": "unload", "tenant": "t1", "status": "running",
            "created_at": "2024-01-01T00:00:00Z",
            "job": {"kind": "unload", "model_key": "0123456789abcdef", "tenant": "t1"}})
        ctx.job_started(record)
        logging.getLogger("x").info("hello %s", "there")
        ctx.job_ended(record)
        logging.getLogger("x").warning("outside", extra={"job_id": "j2"})
    finally:
        logs.set_worker(None)
        logs.configure(logging.WARNING)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "hello there"
    assert (first["job_id"], first["tenant"], first["worker"]) == ("j1", "t1", "w9")
    assert second["job_id"] == "j2" and "tenant" not in second

"""`modelq ls` reads at 80 columns: no heading is cut and a model key is never broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob
from tasks.client import Client
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e

HEADINGS = ("worker", "device", "capacity", "free", "models", "model_key / base", "tenant",
            "size", "pinned", "adapters")


def test_ls_at_80_columns_keeps_headings_and_keys_whole(client: Client, pool: WorkerPool,
                                                        redis_url: str,
                                                        models: dict[str, Path]) -> None:
    pool.start("a-worker-with-a-long-name")
    record = client.submit(LoadJob.model_validate(
        {"model": str(models["lora"]), "adapters": [{"ref": str(models["lora2"]),
                                                      "name": "second"}]})).wait(timeout=120)
    assert record.status is JobStatus.succeeded and record.result is not None, record.error
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url, "COLUMNS": "80", "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "ls"], capture_output=True,
                         text=True, env=env, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    heading_lines = [lines[i - 1] for i, line in enumerate(lines) if line.strip().startswith("──")]
    assert len(heading_lines) == 2 and not any("…" in line for line in heading_lines), out
    for heading in HEADINGS:
        assert any(heading in line for line in heading_lines), (heading, out)
    assert any(record.result.model_key in line for line in lines), out  # whole, on one line
    assert "a-worker-with-a-long-name" in out and "second" in out and "…" not in out

"""`python -m bench.scale` end to end at a tiny size: every figure present and sane.

The targets are for the full run (README, Benchmarks); here the pool is 16 simulated
workers, a 1,000-record backlog and a 2 s worker TTL, in one round, so that it takes about a
minute (it was the suite's longest test at two rounds: 105-143 s); the full run's rounds
alternate their order, which a single round does not show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import figures

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(330)
def test_scale_bench_reports_every_figure_and_loses_no_job(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    subprocess.run(
        [sys.executable, "-m", "bench.scale", "--workers", "16", "--backlog", "1000",
         "--submits", "20", "--rounds", "1", "--seconds", "10", "--victims", "2", "--jobs-per-victim", "2",
         "--interval", "0.5", "--ttl", "2", "--tenant-jobs", "20", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=320,
        stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    found = report["figures"]
    assert set(found) == {f.key for f in figures()}
    for key in ("submit_scale_ratio", "submit_scale_p99_ratio", "redis_cpu_per_1k_submits_ratio_gross"):
        assert 0 < found[key]["median"] < 100, (key, found[key])
    net = found["redis_cpu_per_1k_submits_ratio"]  # at this size the background can swallow it
    assert (0 < net["median"] < 100) if net["runs"] else "less than the noise" in net["note"], net
    assert 0 < found["registry_bytes_per_submit"]["median"] < 4096  # a route, not a registry read
    assert 0 < found["ls_seconds"]["median"] < 30
    assert 0 < found["reap_seconds"]["median"] < 30 and found["reap_seconds"]["runs"] == 2
    assert found["jobs_not_exactly_one_terminal"]["median"] == 0
    context = report["context"]
    assert context["backlog"] == 1000 and context["redis_keys"] > 2000
    rounds = context["rounds"]  # 1 then 16 workers: a sample of each ratio
    assert [(r["one"]["workers"], r["many"]["workers"]) for r in rounds] == [(1, 16)]
    assert all(r["many"]["killed"] == 2 for r in rounds)
    assert rounds[0]["many"]["submits"] > 0 and rounds[0]["one"]["submits"] > 0
    assert found["submit_scale_ratio"]["runs"] == 1
    assert context["terminal_check"]["jobs"] == context["jobs_flowed"] > 20
    assert context["terminal_check"]["statuses"] == {"succeeded": context["jobs_flowed"]}
    if found["tenant_queue_ratio"]["median"] is None:
        assert "tenant_queues" in found["tenant_queue_ratio"]["note"]

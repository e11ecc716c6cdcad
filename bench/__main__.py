"""`python -m bench [--quick] [--json PATH]`: the side-by-side benchmark suite on this machine.

Starts its own redis-server, raw-Celery and `modelq worker` subprocesses and an
in-process baseline, measures every figure as a ratio against its baseline run
in the same pass, prints the table and writes the JSON. Progress goes to stderr.
Three phases: the queue (cache hits and no-op model tasks against raw Celery), the
model tasks (generate and train_adapter against the same work in process,
bench/run_jobs.py) and the loads (bench/side_by_side.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from bench.env import CACHE, ROOT, WORKER_ENV, Bench, big_lora, big_model, variant
from bench.figures import Figure, Report
from bench.inprocess import InProcess
from bench.roundtrip import RoundTrips, measure
from bench.run_jobs import task_model, task_phase
from bench.side_by_side import load_phase
from tests.support.models import build_model

log = logging.getLogger("bench")


def figures() -> list[Figure]:
    return [
        Figure("queue_overhead_ratio", 1.5, "<="),
        Figure("throughput_ratio", 0.8, ">="),
        Figure("run_overhead_ratio", 1.5, "<="),
        Figure("generate_ratio", 1.1, "<="),
        Figure("train_step_ratio", 1.1, "<="),
        Figure("cold_load_ratio_large", 1.2, "<="),  # bf16, the ~250M model (>= 200 MB) on the CPU
        Figure("cold_load_ratio_nf4", 1.1, "<="),
        Figure("artifact_cache_speedup", 10, ">="),
        Figure("adapter_attach_speedup", 20, ">="),  # nf4; bench/gpu.py keeps the bf16 one
        Figure("adapter_attach_ceiling", None, ">="),  # in-process, no queue: context for the row above
        Figure("peak_rss_ratio", 1.3, "<="),
        Figure("cli_status_seconds", 0.5, "<=", unit="s"),
        Figure("estimate_max_error", 0.05, "<="),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs and jobs (about a minute on an idle 2-core machine)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--workers", type=int, default=2, help="workers on each side (default 2)")
    parser.add_argument("--runs", type=int, help="paired load runs (default 5, quick 2)")
    parser.add_argument("--phases", default=",".join(EXTRA_PHASES),
                        help="the run-job phases after the core ones, each its own bench module "
                             f"(default {','.join(EXTRA_PHASES)}; '' for none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    runs = args.runs or (2 if args.quick else 5)
    counts = {"latency_rounds": 3, "jobs_per_round": 8 if args.quick else 20,
              "batches": 3 if args.quick else 5, "batch_size": 20 if args.quick else 60}
    report = Report(figures(), context={
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load_average": os.getloadavg(), "workers": args.workers, "runs": runs, **counts,
        "command": "python -m bench" + (" --quick" if args.quick else "")})
    started = time.monotonic()
    base = big_model()
    lora = big_lora(base)
    tiny = CACHE / "models" / "tiny-llama"
    if not (tiny / "config.json").is_file():
        build_model("llama", tiny)
    tasks = task_model(CACHE)
    with Bench() as bench:
        queue_phase(bench, report, tiny, args.workers, counts, tasks)
        inproc = InProcess(ROOT, env=WORKER_ENV, log=bench.run_dir / "inprocess-tasks.log")
        try:
            task_phase(bench, report, tasks, inproc, runs=runs, rounds=counts["latency_rounds"],
                       jobs_per_round=counts["jobs_per_round"])
        finally:
            inproc.close()
        first, *others = list(bench.pool)
        for worker in others:  # loads go to any worker: keep one, so each load lands on it
            worker.terminate()
        load_phase(bench, report, first, base, lora, runs, attach="nf4")
    for phase in filter(None, args.phases.split(",")):
        extra_phase(report, phase, quick=args.quick)
    report.context["seconds"] = round(time.monotonic() - started, 1)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0


EXTRA_PHASES = ("batching", "scoring", "training")
"""bench/batching.py, bench/scoring.py, bench/training.py: each starts its own Redis and workers."""


def extra_phase(report: Report, name: str, *, quick: bool) -> None:
    """Run `python -m bench.NAME` as its own process and put its figures in this table."""
    if name not in EXTRA_PHASES:
        raise SystemExit(f"unknown phase {name[:40]!r}: choose from {', '.join(EXTRA_PHASES)}")
    out = CACHE / f"phase-{name}.json"
    quick_flag = {"batching": ["--runs", "1"], "scoring": ["--quick"], "training": ["--quick"]}
    log.info("%s: python -m bench.%s", name, name)
    subprocess.run([sys.executable, "-m", f"bench.{name}", "--json", str(out),
                    *(quick_flag[name] if quick else [])], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    report.figures.extend(Figure.from_json(key, f) for key, f in data["figures"].items())
    report.context[name] = data.get("context", {})


def queue_phase(bench: Bench, report: Report, tiny: Path, workers: int, counts: dict[str, int],
                tasks: Path) -> RoundTrips:
    """Cache hits against raw Celery no-ops. Leaves both pools up: the raw workers (each holding
    `tasks` in a module global) and the modelq ones (offering bench/user_tasks.py) serve the
    next phases."""
    log.info("queue: starting %d raw Celery and %d modelq workers", workers, workers)
    bench.start_raw(workers, model=tasks)
    for i in range(workers):
        bench.pool.start(f"q{i}", "--tasks", "bench.user_tasks", wait=False)
    for worker in bench.pool:
        bench.pool.wait_registered(worker, timeout=180)
    trips = RoundTrips(bench, [variant(tiny, f"queue-{i}") for i in range(workers)])
    holders = trips.warm()
    log.info("queue: warm on %s; measuring", sorted(holders))
    found = measure(trips, **counts)
    report.figure("queue_overhead_ratio").add(*found["latency_ratios"])
    report.figure("throughput_ratio").add(*found["throughput_ratios"])
    # Both sides' own medians beside the ratios: the ratios move with the host's load (on two
    # busy cores a no-op's p50 goes from ~3 ms to 10-25 ms, the ratio from ~1.2 to ~0.85).
    ours, raw = median(found["modelq_p50_s"]) * 1e3, median(found["raw_p50_s"]) * 1e3
    report.figure("queue_overhead_ratio").note = (
        f"p50 {ours:.1f} ms (cache hit) / {raw:.1f} ms (Celery no-op)")
    report.figure("throughput_ratio").note = (f"{median(found['modelq_jobs_per_s']):.0f} / "
                                              f"{median(found['raw_jobs_per_s']):.0f} jobs/s")
    if len(found["modelq_workers_used"]) < workers:
        report.figure("throughput_ratio").note += (
            f"; cache hits ran on {len(found['modelq_workers_used'])} of {workers} workers")
    report.context["queue"] = {**found, "workers_holding_model": sorted(holders)}
    report.figure("cli_status_seconds").add(*cli_status(bench, trips))
    return trips


def cli_status(bench: Bench, trips: RoundTrips, count: int = 5) -> list[float]:
    """Wall time of `modelq status JOB_ID` as a fresh process (this checkout's code)."""
    job_id = bench.client.submit(trips.job).job_id
    bench.client.job(job_id).wait(timeout=60)
    env = {**os.environ, "MODELQ_REDIS_URL": bench.redis.url}
    out = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasks.cli", "status", job_id], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - started)
    return out


if __name__ == "__main__":
    sys.exit(main())

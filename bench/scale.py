"""`python -m bench.scale [--workers N] [--backlog N] [--quick] [--json PATH]`: the pool at scale.

What a submit, a heartbeat and a reap cost with N simulated workers (default 2,048) against
one Redis holding a backlog of finished job records (default 1,000,000), each figure against
the same run with one simulated worker. Simulated workers are real `Heartbeat` and `Reaper`
objects, many per process (bench/scale_sim.py); the jobs are consumed by two real
`modelq worker` processes holding a tiny model. Some simulated workers are killed (their
beats stop) while jobs flow, with loads queued behind them, which the reaper must hand to
the live workers; at the end every job submitted must have exactly one terminal record.

The two sizes are measured in `--rounds` rounds (default 3), in turn: 1 then N, N then 1,
1 then N, ... Each round gives one sample of every ratio and a figure is the median of the
rounds' samples: a host whose speed drifts by tens of percent over minutes (a shared VM)
moves both sizes of a round alike, and alternating the order cancels a steady drift.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.figures import Figure, Report, percentile
from bench.scale_hosts import ROOT, SimHosts
from bench.scale_quiet import quiet_window, route_reply_bytes
from bench.scale_redis import ReapWatch, counters, out_bytes, terminal_check, wait_terminal, write_backlog
from bench.scale_windows import background_rate, net_cpu, windowed
from schemas import JobRecord, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.registry import request_key
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

log = logging.getLogger("bench.scale")

INTERVAL, TTL = 2.0, 10.0  # the default heartbeat interval and worker TTL (tasks/settings.py)
CACHE = ROOT / ".bench"


def figures(ttl: float = TTL) -> list[Figure]:
    return [
        Figure("submit_scale_ratio", 1.25, "<="),
        Figure("submit_scale_p99_ratio", 1.5, "<="),
        Figure("registry_bytes_per_submit", 4096, "<=", unit="B"),
        Figure("reap_seconds", 2 * ttl, "<=", unit="s"),
        Figure("tenant_queue_ratio", 1.25, "<="),
        Figure("redis_cpu_per_1k_submits_ratio", 1.5, "<="),  # net of the pool's background
        Figure("redis_cpu_per_1k_submits_ratio_gross", None, "<="),  # with it: context only
        Figure("jobs_not_exactly_one_terminal", 0, "<=", unit="jobs"),
        Figure("ls_seconds", 1.0, "<=", unit="s"),
        Figure("submit_scale_ratio_beats_paused", 1.25, "<="),
        Figure("submit_scale_p99_ratio_beats_paused", 1.5, "<="),
        Figure("redis_cpu_per_1k_submits_ratio_beats_paused", 1.5, "<="),
    ]


def renice(pid: int, nice: int) -> None:
    """Set every thread of process `pid` to niceness `nice` (Linux keeps it per thread; threads
    started later inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


class ScaleBench:
    """One Redis, the real consumers, and the phases measured against them."""

    def __init__(self, run_dir: Path, args: argparse.Namespace) -> None:
        self.run_dir, self.args = run_dir, args
        self.server = RedisServer(data_dir=run_dir / "redis").start()
        self.interval, self.ttl = args.interval, args.ttl
        self.settings = Settings(redis_url=self.server.url, heartbeat_seconds=self.interval,
                                 worker_ttl_seconds=self.ttl, connect_timeout_seconds=10,
                                 command_timeout_seconds=60)
        self.client = Client(self.settings)
        self.keys = self.client.keys
        self.redis = self.server.client()
        self.pool = WorkerPool(self.server.url, run_dir, env={
            "MODELQ_HEARTBEAT_SECONDS": str(self.interval), "MODELQ_WORKER_TTL_SECONDS": str(self.ttl)})
        self.job_ids: list[str] = []
        self.hits: list[LoadJob] = []

    def prepare(self) -> JobRecord:
        """Start the consumers, each holding a tiny model for the cache hits; a finished record."""
        from bench.env import variant
        from tests.support.models import build_model

        tiny = CACHE / "models" / "tiny-llama"
        if not (tiny / "config.json").is_file():
            build_model("llama", tiny)
        self.tiny = tiny
        for i in range(self.args.consumers):
            self.pool.start(f"c{i}", wait=False)
        for worker in self.pool:
            self.pool.wait_registered(worker, timeout=180)
        record = None
        for i in range(self.args.consumers):
            job = LoadJob(model=ModelRef(path=str(variant(tiny, f"scale-hit-{i}"))))
            record = self.client.submit(job).wait(timeout=180)
            if record.status is not JobStatus.succeeded:
                raise RuntimeError(f"warm-up load failed: {record.error}")
            self.hits.append(job)
        for worker in self.pool:  # they stand in for GPU hosts: the producer and Redis go first
            renice(worker.pid, self.args.consumer_nice)
        assert record is not None
        return record

    def victim_jobs(self, tag: str, victims: list[str]) -> dict[str, LoadJob]:
        """A load per victim that only it serves: a model no one loaded before (`tag` names the
        round and size)."""
        from bench.env import variant

        return {name: LoadJob(model=ModelRef(path=str(variant(self.tiny, f"scale-{tag}-{name}"))))
                for name in victims}

    def phase(self, size: int, round_: int = 0) -> dict[str, Any]:
        """Submits with `size` simulated workers: bytes (beats paused), then latency and Redis
        CPU (beats running), killing the victims a third of the way in."""
        victims = [f"sim-{i:05d}" for i in range(min(self.args.victims, size))]
        jobs = self.victim_jobs(f"r{round_}-{size}", victims)
        config = {"redis_url": self.server.url, "interval": self.interval, "ttl": self.ttl,
                  "threads": self.args.threads, "nice": self.args.sim_nice,
                  "victims": {name: request_key(job) for name, job in jobs.items()}}
        wait_terminal(self.redis, self.keys, self.job_ids, timeout=180)  # consumers idle first
        log.info("%d simulated workers: starting", size)
        started = time.monotonic()
        hosts = SimHosts(self.run_dir, config, size, self.args.processes if size > 1 else 1)
        try:
            log.info("%d simulated workers registered in %.1fs", size, time.monotonic() - started)
            out = {"workers": size, "round": round_, "register_seconds": round(time.monotonic() - started, 1),
                   "ls_seconds": ls_seconds(self.server.url)}
            out.update(self.bytes_window(hosts, [j for j in jobs.values()
                                                 for _ in range(self.args.jobs_per_victim)]))
            out.update(quiet_window(hosts.tell, self.redis, self.keys,
                                    lambda job: self.client.submit(job).job_id, self.hits,
                                    self.ttl, self.job_ids))
            out.update(self.submit_loop(hosts, victims))
            out.update(hosts.quit())
        finally:
            hosts.close()
        return out

    def bytes_window(self, hosts: SimHosts, jobs: list[LoadJob]) -> dict[str, Any]:
        """Bytes Redis sends per submit, heartbeats paused and the reaper's turn held, less what
        an idle window as long sends (the consumers' own beats and polls). The jobs go to the
        victims' queues, which nobody consumes until the reaper moves them."""
        hosts.tell("pause")
        self.redis.set(self.keys.reaper_turn(), "bench", px=20_000)
        try:
            first = out_bytes(self.redis)
            info = out_bytes(self.redis) - first  # one INFO reply
            time.sleep(1.0)
            idle_at, idle_start = time.perf_counter(), out_bytes(self.redis)
            time.sleep(1.0)
            idle_end = out_bytes(self.redis)
            rate = (idle_end - idle_start - info) / (time.perf_counter() - idle_at)
            begun, measured = time.perf_counter(), 0
            for job in jobs:  # within a third of a TTL of the pause: no entry lapses meanwhile
                self.job_ids.append(self.client.submit(job).job_id)
                measured += 1
                if time.perf_counter() - begun > self.ttl / 3 - 2:
                    break
            sent = out_bytes(self.redis) - idle_end - info
            rate_bytes = rate * (time.perf_counter() - begun)
        finally:
            self.redis.delete(self.keys.reaper_turn())
            hosts.tell("resume")
        for job in jobs[measured:]:
            self.job_ids.append(self.client.submit(job).job_id)
        return {"bytes_per_submit": max(0.0, sent - rate_bytes) / measured,
                "route_reply_bytes": route_reply_bytes(self.client, jobs[:20]),
                "bytes_submits": measured, "idle_bytes_per_s": round(rate)}

    def submit_loop(self, hosts: SimHosts, victims: list[str]) -> dict[str, Any]:
        """Cache-hit submits back to back, heartbeats running, for `--submits` and at least
        `--min-seconds` (two worker TTLs: every window holds the same share of reaper turns),
        at most `--seconds`; victims killed a third in. Redis CPU is counted until the
        consumers ran the last of them; the pool's background Redis CPU is measured just before
        and after that, nothing submitted and the consumers idle (bench/scale_windows.py)."""
        count, seconds = self.args.submits, self.args.seconds
        least = min(seconds, self.args.min_seconds if self.args.min_seconds is not None
                    else 2 * self.ttl)
        commands: dict[str, Any] = {}  # what the pool's background runs in Redis
        rates = [background_rate(self.redis, self.args.background_seconds or self.ttl, commands)]
        timings: list[tuple[float, float]] = []
        watch: ReapWatch | None = None
        before = counters(self.redis)
        begun = time.perf_counter()
        while len(timings) < count or time.perf_counter() - begun < least:
            elapsed = time.perf_counter() - begun
            if watch is None and (len(timings) >= count // 3 or elapsed >= seconds / 3):
                deaths = {self.keys.worker_queue(v): hosts.kill(v) for v in victims}
                watch = ReapWatch(self.server.client(), deaths, timeout=6 * self.ttl + 30)
                watch.start()
            if elapsed >= seconds:
                break
            job = self.hits[len(timings) % len(self.hits)]
            started = time.perf_counter()
            self.job_ids.append(self.client.submit(job).job_id)
            timings.append((started - begun, time.perf_counter() - started))
        loop_seconds = time.perf_counter() - begun
        # the consumers (niced) run the last cache hits after the loop: their Redis work counts
        # until they caught up, and the background window after starts with them idle
        wait_terminal(self.redis, self.keys, self.job_ids[-20:], timeout=180)
        drained_seconds, after = time.perf_counter() - begun, counters(self.redis)
        assert watch is not None
        watch.join()
        rates.append(background_rate(self.redis, self.args.background_seconds or self.ttl))
        latencies = [latency for _, latency in timings]
        return {"submits": len(timings), "p50_all_ms": 1000 * percentile(latencies, 50),
                "p99_all_ms": 1000 * percentile(latencies, 99),
                **windowed(timings, self.ttl / 2),
                **net_cpu(after.cpu_seconds - before.cpu_seconds, drained_seconds, rates,
                          len(timings)),
                "submit_seconds": round(loop_seconds, 2),
                "background_commands": commands, "killed": len(victims),
                "reap_seconds": [watch.seconds.get(self.keys.worker_queue(v)) for v in victims]}

    def close(self) -> None:
        self.pool.stop_all()
        self.client.redis.close()
        self.server.close()


def tenant_queue_ratio(report: Report, jobs: int) -> None:
    """The figure from bench/tenant_queues.py's `measure()`, when that module exists."""
    figure = report.figure("tenant_queue_ratio")
    try:
        from bench import tenant_queues
    except ImportError:
        figure.note = "bench/tenant_queues.py is not in this checkout"
        return
    try:
        figure.add(float(tenant_queues.measure(jobs=jobs, rounds=max(1, min(5, jobs // 40)))
                         ["tenant_queue_ratio"]))
    except Exception as exc:  # reported as missing, never guessed
        log.exception("bench/tenant_queues.py measure() failed")
        figure.note = f"bench/tenant_queues.py measure() failed: {exc!r}"


def fill(report: Report, one: dict[str, Any], many: dict[str, Any], ttl: float) -> None:
    """One round's samples of the figures, from its two phases (`one` simulated worker and
    `many`)."""
    report.figure("submit_scale_ratio").add(many["p50_ms"] / one["p50_ms"])
    report.figure("submit_scale_p99_ratio").add(many["p99_ms"] / one["p99_ms"])
    report.figure("registry_bytes_per_submit").add(many["route_reply_bytes"])
    reaps = report.figure("reap_seconds")
    reaps.add(*(s for s in many["reap_seconds"] if s is not None))
    lost = sum(1 for s in many["reap_seconds"] if s is None)
    if lost:
        reaps.note = "; ".join(filter(None, [reaps.note, f"{lost} dead worker queue(s) not "
                                             f"emptied within {6 * ttl + 30:.0f}s"]))
    net = report.figure("redis_cpu_per_1k_submits_ratio")
    if one["redis_cpu_per_1k"] > 0 and many["redis_cpu_per_1k"] > 0:
        net.add(many["redis_cpu_per_1k"] / one["redis_cpu_per_1k"])
    else:  # the background measured around the loop took all of it: too few submits to tell
        net.note = ("a round's submits cost Redis less than the noise of its background "
                    "(net 0 s): run more --submits or --seconds")
    report.figure("redis_cpu_per_1k_submits_ratio_gross").add(
        many["redis_cpu_per_1k_gross"] / one["redis_cpu_per_1k_gross"])
    report.figure("ls_seconds").add(many["ls_seconds"])
    for key, value in (("submit_scale_ratio", "p50_ms"), ("submit_scale_p99_ratio", "p99_ms"),
                       ("redis_cpu_per_1k_submits_ratio", "redis_cpu_per_1k")):
        report.figure(f"{key}_beats_paused").add(many[f"quiet_{value}"] / one[f"quiet_{value}"])


def ls_seconds(url: str, tries: int = 3) -> float:
    """Seconds `modelq ls` (the default summary, a fresh process) takes to answer: the median
    of `tries`, one at a time (a single try on a loaded 2-core host swings by a third)."""
    env = {**os.environ, "MODELQ_REDIS_URL": url, "COLUMNS": "100"}
    took = []
    for _ in range(tries):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "tasks.cli", "ls"], env=env, check=True, timeout=60,
                       stdout=subprocess.DEVNULL)
        took.append(time.monotonic() - started)
    return round(statistics.median(took), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 workers, a 100,000-record backlog")
    parser.add_argument("--workers", type=int, help="simulated workers (default 2048, quick 256)")
    parser.add_argument("--backlog", type=int, help="job records written first (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of both sizes, in alternating order (each a sample)")
    parser.add_argument("--submits", type=int, default=300, help="timed submits per size")
    parser.add_argument("--seconds", type=float, default=60, help="at most this long per size")
    parser.add_argument("--min-seconds", type=float, help="at least this long per size (2 TTLs)")
    parser.add_argument("--background-seconds", type=float,
                        help="each window of the pool's background Redis CPU (default 1 TTL)")
    parser.add_argument("--victims", type=int, default=4, help="simulated workers killed")
    parser.add_argument("--jobs-per-victim", type=int, default=5)
    parser.add_argument("--consumers", type=int, default=2, help="real `modelq worker` processes")
    parser.add_argument("--processes", type=int, default=2, help="simulated worker host processes")
    parser.add_argument("--threads", type=int, default=4, help="beating threads per host process")
    parser.add_argument("--consumer-nice", type=int, default=19,
                        help="CPU niceness of the consumers (GPU hosts, other machines in a real pool)")
    parser.add_argument("--sim-nice", type=int, default=10,
                        help="CPU niceness of the simulated hosts (other machines in a real pool)")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="heartbeat seconds")
    parser.add_argument("--ttl", type=float, default=TTL, help="worker TTL seconds")
    parser.add_argument("--tenant-jobs", type=int, default=200,
                        help="cache hits timed per side for tenant_queue_ratio")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    args.workers = args.workers or (256 if args.quick else 2048)
    args.backlog = args.backlog if args.backlog is not None else (100_000 if args.quick else 1_000_000)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    report = Report(figures(args.ttl), context={
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load_average": os.getloadavg(), "workers": args.workers, "backlog": args.backlog,
        "heartbeat_seconds": args.interval, "worker_ttl_seconds": args.ttl, "consumers": args.consumers,
        "nice": {"consumers": args.consumer_nice, "simulated": args.sim_nice},
        "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])})
    started = time.monotonic()
    (CACHE / "scale").mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE / "scale"))  # logs kept here
    bench = ScaleBench(run_dir, args)
    try:
        template = bench.prepare()
        log.info("writing a backlog of %d job records", args.backlog)
        seconds = write_backlog(bench.redis, bench.keys, template, args.backlog,
                                ttl=bench.settings.record_ttl_seconds)
        report.context.update(backlog_seconds=round(seconds, 1),
                              backlog_record_bytes=len(template.model_dump_json()),
                              redis_keys=bench.redis.dbsize())
        rounds: list[dict[str, Any]] = []
        report.context.update(rounds=rounds)
        for r in range(args.rounds):  # 1 then N, N then 1, ...: a drifting host cancels out
            sizes = (1, args.workers) if r % 2 == 0 else (args.workers, 1)
            done = {size: bench.phase(size, r) for size in sizes}
            rounds.append({"one": done[1], "many": done[args.workers]})
            fill(report, done[1], done[args.workers], args.ttl)
        left = wait_terminal(bench.redis, bench.keys, bench.job_ids, timeout=180)
        check = terminal_check(bench.redis, bench.keys, bench.job_ids)
        report.figure("jobs_not_exactly_one_terminal").add(check["bad"])
        report.context.update(terminal_check=check, unfinished=left, jobs_flowed=len(bench.job_ids))
    finally:
        bench.close()
    tenant_queue_ratio(report, args.tenant_jobs)
    report.context["seconds"] = round(time.monotonic() - started, 1)
    print(report.table())
    print(summary(report.context))
    if args.json:
        report.write_json(args.json)
    return 0


def summary(context: dict[str, Any]) -> str:
    """The raw figures behind the ratios, one line per phase (a size in a round)."""
    lines = [f"backlog {context.get('backlog')} records written in {context.get('backlog_seconds')}s "
             f"({context.get('redis_keys')} keys); {context.get('jobs_flowed')} jobs submitted"]
    for p in (phase for r in context.get("rounds", []) for phase in (r["one"], r["many"])):
        lines.append(f"round {p['round']}, {p['workers']} workers: submit p50 {p['p50_ms']:.2f} ms, p99 "
                     f"{p['p99_ms']:.2f} ms ({p['submits']}), {p['route_reply_bytes']:.0f} B "
                     f"route reply (INFO: {p['bytes_per_submit']:.0f} B/submit), "
                     f"Redis CPU {p['redis_cpu_per_1k']:.3f} s/1k submits net "
                     f"({p['redis_cpu_per_1k_gross']:.3f} gross), killed {p['killed']}, "
                     f"reaped in {p['reap_seconds']} s, entry {p['entry_bytes']} B, "
                     f"beats late p99 {p['beat_late_p99_s']} s; beats paused: submit p50 "
                     f"{p['quiet_p50_ms']:.2f} ms, p99 {p['quiet_p99_ms']:.2f} ms "
                     f"({p['quiet_submits']}), Redis CPU {p['quiet_redis_cpu_per_1k']:.3f} s/1k")
    check = context.get("terminal_check", {})
    lines.append(f"terminal check: {check.get('bad')} of {check.get('jobs')} jobs without exactly "
                 f"one terminal record; statuses {check.get('statuses')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

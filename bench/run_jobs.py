"""Run jobs through modelq against the same work written by hand, pair by pair.

* run_overhead_ratio: a no-op model task (`bench.noop`, bench/user_tasks.py) on a
  resident model against the raw Celery task that reads a model kept in a module
  global (`bench.model_noop`, bench/raw_celery.py), one job at a time, interleaved;
  the ratio of the two p50s per round.
* generate_ratio: `modelq.generate` (greedy, TOKENS new tokens) submitted and waited
  for, against tokenize + `model.generate` + decode of the same prompt on the same
  model in a warm process (bench/by_hand.py); the two must give the same text.
* train_step_ratio: seconds per step of `modelq.train_adapter`, from the timestamps of
  its per-step progress events, against the same loop in process (the same LoRA
  config, data and batch size), timed the same way: first step's end to last step's end.

The model is a small llama with a tokenizer (tests/support/models.py), sized so that a
generate takes a few hundred ms on one thread; the worker and the in-process side both
run with one thread (bench/env.py WORKER_ENV).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import raw_celery
from bench.env import Bench
from bench.figures import Report, percentile
from bench.inprocess import InProcess
from bench.user_tasks import NOOP
from schemas import JobRecord, JobStatus, LoadJob, ModelRef, RunResult
from tests.support.models import TOKENIZER_LINES, build_model

log = logging.getLogger(__name__)

PROMPT = "the quick brown fox jumps over the lazy dog"
TOKENS = 32
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
BATCH_SIZE = 4
LEARNING_RATE = 1e-4
SIZES = {"hidden": 256, "layers": 4, "vocab": 256}
"""The task model: ~3.4M float32 parameters; 32 greedy tokens take 0.2-0.5 s on one thread here."""


def task_model(cache: Path, name: str = "llama-tasks", sizes: dict[str, int] | None = None) -> Path:
    """A llama with a tokenizer under `cache`/models, built once and reused."""
    folder = cache / "models" / name
    if not (folder / "tokenizer.json").is_file():
        build_model("llama", folder, tokenizer=True, **(sizes or SIZES))  # type: ignore[arg-type]
    return folder


def dataset(folder: Path) -> Path:
    """The training data: the test tokenizer's lines as JSON lines of {"text": ...}."""
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in TOKENIZER_LINES))
    return path


@dataclass
class TaskSamples:
    """Raw measurements of the task runs, in seconds."""

    run_p50: list[float] = field(default_factory=list)
    raw_model_p50: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    inproc_generate: list[float] = field(default_factory=list)
    generate_worker_seconds: list[float] = field(default_factory=list)  # RunResult.seconds
    train_step: list[float] = field(default_factory=list)
    inproc_train_step: list[float] = field(default_factory=list)
    train_round_trip: list[float] = field(default_factory=list)
    generated: str = ""


class TaskRuns:
    """The task jobs on one resident model, and their hand-written counterparts."""

    def __init__(self, bench: Bench, model: Path, inproc: InProcess, data: Path) -> None:
        self.bench = bench
        self.model = model
        self.inproc = inproc
        self.data = data
        self.raw = raw_celery.create_app(bench.redis.url)
        self.samples = TaskSamples()
        self.key = ""
        self.payload: dict[str, Any] = {}  # what the raw task is sent: the run job's fields

    def load(self) -> str:
        """Load the model on a worker (routing picks one); warm both sides once, unmeasured."""
        record = self.bench.client.submit(LoadJob(model=ModelRef(path=str(self.model)))).wait(timeout=120)
        if record.status is not JobStatus.succeeded or record.result is None:
            raise RuntimeError(f"loading the task model failed: {record.error}")
        self.key = record.result.model_key
        self.payload = {"job": {"task": NOOP, "model": {"model_key": self.key}, "args": [], "kwargs": {}}}
        for _ in range(3):
            self.run_once()
            self.raw_once()
        self.call("modelq.generate", prompts=PROMPT, max_new_tokens=TOKENS)  # loads the tokenizer
        self.inproc.generate(self.model, PROMPT, TOKENS)
        return record.worker or "?"

    def call(self, task: str, **kwargs: Any) -> tuple[float, JobRecord, RunResult]:
        """Round trip of one run job on the resident model: submit to the terminal record."""
        started = time.perf_counter()
        record = self.bench.client.run(task, model=self.key, kwargs=kwargs).wait(timeout=300)
        elapsed = time.perf_counter() - started
        if record.status is not JobStatus.succeeded or not isinstance(record.result, RunResult):
            raise RuntimeError(f"{task} ended {record.status.value}: {record.error}")
        return elapsed, record, record.result

    def run_once(self) -> float:
        return self.call(NOOP)[0]

    def raw_once(self) -> float:
        started = time.perf_counter()
        self.raw.send_task(raw_celery.MODEL_TASK, args=[self.payload],
                           queue=raw_celery.QUEUE).get(timeout=60)
        return time.perf_counter() - started

    def overhead(self, rounds: int, jobs: int) -> list[float]:
        """Per round: p50 of `jobs` modelq no-op tasks / p50 of as many raw ones, interleaved."""
        out = []
        for _ in range(rounds):
            raw, ours = [], []
            for _ in range(jobs):
                raw.append(self.raw_once())
                ours.append(self.run_once())
            self.samples.raw_model_p50.append(percentile(raw, 50))
            self.samples.run_p50.append(percentile(ours, 50))
            out.append(self.samples.run_p50[-1] / self.samples.raw_model_p50[-1])
        return out

    def generate(self, runs: int, per_run: int) -> list[float]:
        """Per run: median of `per_run` generate jobs / median of as many in process, alternated."""
        s = self.samples
        out = []
        for _ in range(runs):
            ours, theirs = [], []
            for _ in range(per_run):
                seconds, _, result = self.call("modelq.generate", prompts=PROMPT, max_new_tokens=TOKENS)
                ours.append(seconds)
                s.generate_worker_seconds.append(result.seconds)
                local, text = self.inproc.generate(self.model, PROMPT, TOKENS)
                theirs.append(local)
                if result.value != [text]:
                    raise RuntimeError(f"modelq.generate gave {result.value!r}, in process {text!r}")
                s.generated = text
            s.generate += ours
            s.inproc_generate += theirs
            out.append(statistics.median(ours) / statistics.median(theirs))
        return out

    def train(self, runs: int, steps: int) -> list[float]:
        """Per run: seconds per step through modelq / in process (steps 2..N, from step-end times)."""
        s = self.samples
        self.call("modelq.add_adapter", name="bench", config=LORA)
        out = []
        for _ in range(runs):
            seconds, record, _ = self.call("modelq.train_adapter", adapter="bench", dataset=str(self.data),
                                           steps=steps, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE)
            s.train_round_trip.append(seconds)
            s.train_step.append(per_step(self.step_times(record.job_id)))
            s.inproc_train_step.append(per_step(self.inproc.train(
                self.model, self.data, steps, BATCH_SIZE, LEARNING_RATE, LORA)))
            out.append(s.train_step[-1] / s.inproc_train_step[-1])
        return out

    def step_times(self, job_id: str) -> list[float]:
        """Timestamps of the job's per-step progress events (those carrying metrics)."""
        events = self.bench.client.store.events(job_id, count=10_000)
        return [event.at.timestamp() for _, event in events if event.metrics]


def per_step(marks: list[float]) -> float:
    """Seconds per step from step-end times: first to last over the steps between (the first
    step, with its lazy initialisations, is left out on both sides)."""
    if len(marks) < 2:
        raise ValueError(f"need two steps or more to time one, got {len(marks)}")
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def task_phase(bench: Bench, report: Report, model: Path, inproc: InProcess, *, runs: int,
               rounds: int, jobs_per_round: int, per_run: int = 5, steps: int = 10) -> TaskRuns:
    """Fills run_overhead_ratio, generate_ratio and train_step_ratio in `report`.

    Needs a modelq worker started with `--tasks bench.user_tasks` and a raw Celery
    worker holding `model` (`bench.start_raw(n, model=model)`).
    """
    tasks = TaskRuns(bench, model, inproc, dataset(bench.run_dir))
    holder = tasks.load()
    log.info("tasks: %s resident on %s; no-op tasks against raw Celery", model.name, holder)
    report.figure("run_overhead_ratio").add(*tasks.overhead(rounds, jobs_per_round))
    log.info("tasks: generate, %d runs of %d", runs, per_run)
    report.figure("generate_ratio").add(*tasks.generate(runs, per_run))
    log.info("tasks: train_adapter, %d runs of %d steps", runs, steps)
    report.figure("train_step_ratio").add(*tasks.train(runs, steps))
    report.context["tasks"] = {"model": str(model), "holder": holder, **vars(tasks.samples)}
    return tasks

"""`python -m bench.training [--quick]`: training jobs' durability and speed, side by side.

* checkpoint_overhead_ratio: steps per second of `modelq.train_adapter` with
  checkpoint_steps=10 / without checkpoints (same job otherwise), runs alternated.
* resume_lost_steps: a worker killed (SIGKILL) at a random step of a job with
  checkpoint_steps=10, on a pool of two: the steps the job trains twice (the killed
  attempt's last step minus the step the next attempt resumed from).
* trl_step_ratio: seconds per step of `modelq.train_adapter` / TRL's SFTTrainer in a
  process of its own, on the same base, LoRA, data, batch size and learning rate
  (constant schedule, no checkpoints, one thread each), from step-end times.

All are noisy on a shared machine: read them as orders of magnitude unless run alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.env import ROOT, WORKER_ENV, Bench
from bench.figures import Figure, Report
from bench.run_jobs import BATCH_SIZE, LEARNING_RATE, LORA, dataset, per_step, task_model
from schemas import JobStatus, LoadJob, RunResult

log = logging.getLogger("bench.training")
CHECKPOINT_STEPS = 10


def figures() -> list[Figure]:
    return [Figure("checkpoint_overhead_ratio", 0.9, ">="),
            Figure("resume_lost_steps", CHECKPOINT_STEPS, "<="),
            Figure("trl_step_ratio", 1.1, "<=")]


class Training:
    """Training jobs on a pool of two workers sharing one checkpoint folder."""

    def __init__(self, bench: Bench, model: Path, data: Path) -> None:
        self.bench, self.model, self.data = bench, model, data

    def job(self, steps: int, checkpoint_steps: int) -> dict[str, Any]:
        return {"adapter": f"b{uuid.uuid4().hex[:8]}", "dataset": str(self.data), "steps": steps,
                "lora": LORA, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                "checkpoint_steps": checkpoint_steps}

    def run(self, key: str, steps: int, checkpoint_steps: int) -> float:
        """Seconds per step of one job on the resident model `key` (steps 2..N)."""
        record = self.bench.client.run("modelq.train_adapter", model=key,
                                       kwargs=self.job(steps, checkpoint_steps)).wait(timeout=600)
        if record.status is not JobStatus.succeeded:
            raise RuntimeError(f"training ended {record.status.value}: {record.error}")
        return per_step(self.step_marks(record.job_id))

    def step_marks(self, job_id: str) -> list[float]:
        events = self.bench.client.store.events(job_id, count=100_000)
        return [event.at.timestamp() for _, event in events if event.metrics]

    def lost_steps(self, steps: int) -> float:
        """Kill the training job's worker at a random step; the steps trained twice."""
        handle = self.bench.client.run("modelq.train_adapter", model=LoadJob(model=str(self.model)),
                                       kwargs=self.job(steps, CHECKPOINT_STEPS))
        kill_at = random.randint(CHECKPOINT_STEPS + 1, steps - CHECKPOINT_STEPS)
        for event in handle.events(timeout=600):
            if event.metrics and event.progress is not None and (event.progress.done or 0) >= kill_at:
                break
        victim = handle.status().worker
        next(w for w in self.bench.pool if w.name == victim).kill()
        record = handle.wait(timeout=600)
        if record.status is not JobStatus.succeeded or not isinstance(record.result, RunResult):
            raise RuntimeError(f"the resumed job ended {record.status.value}: {record.error}")
        resumed = int(record.result.value["resumed_from_step"])  # type: ignore[index,call-overload]
        events = self.bench.client.store.events(handle.job_id, count=100_000)
        done = [int(e.progress.done or 0) for _, e in events if e.metrics and e.progress is not None]
        restart = next((i for i in range(1, len(done)) if done[i] <= done[i - 1]), len(done))
        return float(max(done[:restart]) - resumed)  # the killed attempt's last step - the resume point


def trl_marks(model: Path, data: Path, steps: int) -> list[float]:
    """Step-end times of TRL's SFTTrainer on the same work, in a one-thread process of its own."""
    argv = [sys.executable, "-m", "bench.training", "--trl-baseline", str(model), str(data), str(steps)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, **WORKER_ENV, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the TRL baseline failed: {done.stderr[-2000:]}")
    marks: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return marks


def _trl_baseline(model: str, data: str, steps: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    marks: list[float] = []

    class Marks(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    config = SFTConfig(output_dir=str(Path(data).parent / "trl"), max_steps=steps,
                       per_device_train_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                       lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                       logging_steps=1000, max_length=512, dataloader_num_workers=0, disable_tqdm=True,
                       bf16=False, gradient_checkpointing=False)  # TRL turns both on by default
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=config,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Marks()])
    trainer.train()
    print(json.dumps(marks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training")
    parser.add_argument("--quick", action="store_true", help="one run of each, fewer steps")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--trl-baseline", nargs=3, metavar=("MODEL", "DATA", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_baseline:
        _trl_baseline(args.trl_baseline[0], args.trl_baseline[1], int(args.trl_baseline[2]))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    runs, steps = (1, 30) if args.quick else (3, 40)
    report = Report(figures())
    bench = Bench()
    bench.pool.env["MODELQ_CHECKPOINT_DIR"] = str(bench.run_dir / "checkpoints")  # both workers see it
    try:
        model = task_model(bench.cache)
        for name in ("tr1", "tr2"):
            bench.pool.start(name)
        training = Training(bench, model, dataset(bench.run_dir))
        loaded = bench.client.submit(LoadJob(model=str(model))).wait(timeout=300)
        key = loaded.result.model_key  # type: ignore[union-attr]
        training.run(key, 3, 0)  # warm: tokenizer, first step
        for _ in range(runs):
            plain, saving = training.run(key, steps, 0), training.run(key, steps, CHECKPOINT_STEPS)
            report.figure("checkpoint_overhead_ratio").add(plain / saving)
            report.figure("trl_step_ratio").add(plain / per_step(trl_marks(model, training.data, steps)))
        report.figure("resume_lost_steps").add(training.lost_steps(steps))
    finally:
        bench.close()
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

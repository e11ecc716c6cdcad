"""`modelq train BASE DATASET`: the everyday training command (no torch).

It submits one self-contained `modelq.train_adapter` run job: the load spec of BASE (the
flags of `modelq load`) and a LoRA config, so that any worker can load the base itself
and a job whose worker dies resumes from its checkpoints elsewhere. `--wait` follows the
job live: the step, the loss and the time left, then the record.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from tasks.cli.common import TIMED_OUT, exit_for, fail, show, submit, submit_and_report, tenant_option
from tasks.cli.jobs import load_options, load_spec


@click.command()
@click.argument("base")
@click.argument("dataset")
@load_options
@click.option("--adapter-name", default="default", show_default=True, help="The new adapter's name.")
@click.option("--lora-r", default=8, show_default=True, type=int,
              help="LoRA rank (lora_alpha is twice it).")
@click.option("--target-module", "targets", multiple=True,
              help="A module LoRA wraps (repeat; default: peft's).")
@click.option("--steps", default=100, show_default=True, type=int, help="Optimizer steps.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--learning-rate", default=2e-4, show_default=True, type=float)
@click.option("--output-dir", default=None, help="Where the worker saves the trained adapter.")
@click.option("--checkpoint-steps", default=50, show_default=True, type=int, help="0: no checkpoints.")
@click.option("--report-to", type=click.Choice(["tensorboard"]), default=None,
              help="Also write TensorBoard event files (under OUTPUT_DIR/runs).")
@tenant_option()
@click.option("--wait", is_flag=True, help="Follow the job live until it ends; exit code says how.")
@click.option("--timeout", default=None, type=float, help="Seconds to wait (with --wait).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def train(base: str, dataset: str, adapter_name: str, lora_r: int, targets: tuple[str, ...], steps: int,
          batch_size: int, learning_rate: float, output_dir: str | None, checkpoint_steps: int,
          report_to: str | None, tenant: str, wait: bool, timeout: float | None, as_json: bool,
          **flags: Any) -> None:
    """Train a new LoRA adapter on BASE from DATASET (JSON lines), resumably."""
    lora: dict[str, Any] = {"r": lora_r, "lora_alpha": 2 * lora_r}
    if targets:
        lora["target_modules"] = list(targets)
    kwargs: dict[str, Any] = {"adapter": adapter_name, "dataset": os.path.abspath(dataset), "steps": steps,
                              "batch_size": batch_size, "learning_rate": learning_rate, "lora": lora,
                              "checkpoint_steps": checkpoint_steps}
    if output_dir is not None:
        kwargs["output_dir"] = os.path.abspath(output_dir)
    if report_to is not None:
        kwargs["report_to"] = report_to
    load = load_spec(base, tenant, flags)
    load.pop("kind")
    job = {"kind": "run", "task": "modelq.train_adapter", "tenant": tenant, "model": {"load": load},
           "kwargs": kwargs}
    if not wait or as_json:
        submit_and_report(job, wait, timeout, as_json)
        return
    _follow(submit(job), timeout)


def _follow(handle: Any, timeout: float | None) -> None:
    """One line per step, overwritten in place: step, loss, time left; then the record."""
    from schemas import TimedOut

    started, first = time.monotonic(), None
    try:
        for event in handle.events(timeout=timeout):
            progress, metrics = event.progress, event.metrics or {}
            if progress is None or "loss" not in metrics or not progress.total:
                continue
            done, total = int(progress.done or 0), int(progress.total)
            first = done if first is None else first
            rate = (time.monotonic() - started) / max(done - first, 1)
            left = rate * (total - done) if done > first else float("nan")
            click.echo(f"\rstep {done}/{total}  loss {metrics['loss']:.4f}  "
                       f"left {_clock(left)}", nl=False, err=True)
        click.echo("", err=True)
        record = handle.wait(timeout=5)
    except TimedOut as exc:
        fail(exc.message, TIMED_OUT)
    show(record, False)
    sys.exit(exit_for(record))


def _clock(seconds: float) -> str:
    if seconds != seconds:
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:02d}:{secs:02d}"


COMMANDS = [train]

"""`modelq watch`: a live progress bar that follows a job's events to its end (no torch)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from schemas import JobRecord
from tasks.cli import render


def follow_with_bar(client: Any, job_id: str, timeout: float | None) -> JobRecord:
    """Show each event as it comes; returns the record when the job ends or `timeout` passes."""
    console = render.console()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("queued", total=1.0)
        for event in client.job(job_id).events(timeout=timeout):
            label = event.stage.value if event.stage is not None else event.status.value
            fraction = event.progress.fraction if event.progress is not None else 0.0
            bar.update(task, description=label, completed=fraction)
            if event.message:
                bar.console.print(render.event_line(event))
        bar.update(task, completed=1.0)
    record: JobRecord = client.status(job_id)
    return record

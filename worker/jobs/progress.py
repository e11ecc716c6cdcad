"""Progress hooks: tqdm bars from huggingface_hub and transformers, turned into job events.

A `Reporter` is the small hook object the runner hands to resolution and loading;
it throttles writes so a fast bar costs a handful of Redis round trips, and it is
where a cancel request is noticed between stages.

A task's per-step progress (`ctx.progress(done, total, metrics={"loss": ...})`) becomes
one event each, in order. `StepSender` writes them from one background thread; every
other write of the job's record (a stage, the final record) first waits for the steps
already handed over (`flush`), so the stream keeps its order and no step lands after the
end. Steps are best effort, like all progress: a Redis error is logged, not raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm as base_tqdm

from schemas import Progress, Stage

log = logging.getLogger(__name__)

Emit = Callable[[Stage, Progress | None, str | None, dict[str, float] | None], None]
"""(stage, progress, message, metrics): one report of a running job."""


class Reporter:
    """Sends a running job's stage and progress, at most every `interval` seconds."""

    def __init__(self, emit: Emit, cancelled: Callable[[], bool], interval: float = 0.25) -> None:
        self._emit = emit
        self._cancelled = cancelled
        self.interval = interval
        self.stage_now: Stage | None = None
        self._last = 0.0

    def stage(self, stage: Stage, message: str | None = None) -> None:
        """Enter `stage` (always sent)."""
        self.stage_now = stage
        self._emit(stage, Progress(fraction=0.0), message, None)
        self._last = time.monotonic()

    def progress(self, done: float, total: float | None, unit: str = "bytes",
                 metrics: dict[str, float] | None = None) -> None:
        """Report progress in the current stage (sent when due, and at the end); a report
        with `metrics` (a training step's loss) is always sent."""
        if self.stage_now is None:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and metrics is None and now - self._last < self.interval:
            return
        fraction = min(1.0, done / total) if total else 0.0
        self._emit(self.stage_now, Progress(fraction=fraction, done=int(done),
                                            total=None if total is None else int(total),
                                            unit=unit), None, metrics)
        self._last = now

    def cancelled(self) -> bool:
        return self._cancelled()

    def tqdm_class(self) -> type[base_tqdm]:
        """A silent tqdm whose updates become this reporter's progress."""
        reporter = self
        byte_bars: dict[int, tuple[float, float]] = {}

        class ReportingTqdm(base_tqdm):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                self._unit = kwargs.get("unit") or "it"
                super().__init__(*args, **kwargs)
                self.n: float = 0

            def update(self, n: float | None = 1) -> bool | None:
                self.n += 1 if n is None else n
                if self._unit == "B":
                    byte_bars[id(self)] = (self.n, self.total or 0)
                    done = sum(d for d, _ in byte_bars.values())
                    total = sum(t for _, t in byte_bars.values())
                    reporter.progress(done, total or None, "bytes")
                else:
                    reporter.progress(self.n, self.total, self._unit)
                return None

            def __iter__(self) -> Iterator[Any]:
                for item in self.iterable:
                    yield item
                    self.update(1)

            def close(self) -> None:
                pass

        return ReportingTqdm


@contextmanager
def transformers_bars(reporter: Reporter) -> Iterator[None]:
    """Route transformers' own bars ('Loading weights') to `reporter` while loading."""
    from transformers.utils import logging as hf_logging

    bar = reporter.tqdm_class()
    previous = hf_logging.set_tqdm_hook(lambda _factory, args, kwargs: bar(*args, **kwargs))
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)

Send = Callable[[], object]
"""One queued write of a step event."""


class StepSender:
    """One daemon thread that runs queued writes in order."""

    def __init__(self) -> None:
        self._writes: queue.Queue[Send] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, write: Send) -> None:
        """Run `write` on the sender's thread, after the writes handed over before it."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelq-steps", daemon=True)
                self._thread.start()
        self._writes.put(write)

    def flush(self) -> None:
        """Wait until every write handed over so far has run."""
        if self._thread is not None:
            self._writes.join()

    def _run(self) -> None:
        while True:
            write = self._writes.get()
            try:
                write()
            except Exception as exc:  # progress is best effort; the job goes on
                log.warning("could not send a step event: %s", exc)
            finally:
                self._writes.task_done()

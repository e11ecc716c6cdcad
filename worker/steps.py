"""Step events sent off the job's thread: a training step does not wait on Redis.

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
from collections.abc import Callable

log = logging.getLogger(__name__)

Send = Callable[[], object]


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

"""worker/jobs/progress.py: step events leave the job's thread, keep their order, and a flush waits
for them; a failing write is logged, not raised."""

from __future__ import annotations

import threading
import time

from worker.jobs.progress import StepSender


def test_writes_run_in_order_off_the_callers_thread_and_flush_waits() -> None:
    sender, seen, threads = StepSender(), list[int](), set[str]()
    gate = threading.Event()

    def write(i: int) -> None:
        gate.wait(5)
        threads.add(threading.current_thread().name)
        seen.append(i)

    started = time.monotonic()
    for i in range(5):
        sender.send(lambda i=i: write(i))
    assert time.monotonic() - started < 1 and seen == []  # the caller did not wait
    gate.set()
    sender.flush()
    assert seen == [0, 1, 2, 3, 4] and threads == {"modelq-steps"}


def test_a_failing_write_does_not_stop_the_next() -> None:
    sender, seen = StepSender(), list[str]()

    def boom() -> None:
        raise ConnectionError("Redis away")

    sender.send(boom)
    sender.send(lambda: seen.append("after"))
    sender.flush()
    assert seen == ["after"]
    StepSender().flush()  # nothing sent: returns at once

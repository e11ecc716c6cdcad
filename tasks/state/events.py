"""Following a job's event stream until it ends: what `JobHandle.events` and the gateway's
event stream read (no torch)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from schemas import TERMINAL, Event
from tasks.state.store import Store


def follow(store: Store, job_id: str, timeout: float | None = None,
           poll_ms: int = 1000) -> Iterator[Event]:
    """Yield a job's events from the start until a terminal one (or `timeout` passes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    after = "0-0"
    while True:
        block = poll_ms
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            block = max(1, min(poll_ms, int(left * 1000)))
        batch = store.events(job_id, after=after, block_ms=block)
        ended = not batch and store.get(job_id).terminal
        if ended:
            # The job ended between the read and the record: its last events went in with the
            # terminal record (one transaction), so one more read, without waiting, has them.
            batch = store.events(job_id, after=after)
        for entry_id, event in batch:
            after = entry_id  # the next read starts past it
            yield event
            if event.status in TERMINAL:
                return
        if ended:  # ended (or its events expired) past the events read
            return

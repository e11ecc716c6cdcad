"""One delivery of a job: decode it, move its record through its states, run it.

The Celery task body calls `Runner.run` and nothing else. Every outcome ends in a
terminal record: succeeded, failed with an ErrorInfo, or cancelled. A delivery of
a job that already ended does nothing (no second effect).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from schemas import (
    AttachAdapterJob, Cancelled, Envelope, ErrorInfo, JobRecord, JobStatus, LoadJob, ModelInfo,
    Progress, Stage, UnloadJob, WorkerLost, decode_envelope,
)
from schemas.errors import InvalidJob, JobNotFound, ModelqError
from tasks.store import Store
from worker.errors import scrub, translate
from worker.progress import Reporter
from worker.service import ModelService

log = logging.getLogger(__name__)

STARTABLE = frozenset({JobStatus.queued, JobStatus.retrying, JobStatus.running})


class RunObserver(Protocol):
    """Cross-cutting work around a job (metrics, log context): told when it starts and ends."""

    def job_started(self, record: JobRecord) -> None: ...

    def job_ended(self, record: JobRecord) -> None: ...


class Runner:
    """Runs job envelopes for one worker and writes their records."""

    def __init__(self, store: Store, service: ModelService, *, max_attempts: int,
                 on_change: Callable[[], None] = lambda: None,
                 observers: Sequence[RunObserver] = (),
                 admit: Callable[[Any, Envelope | None], bool] = lambda payload, envelope: True,
                 ) -> None:
        self.store = store
        self.admit = admit  # tenants: signature, expiry, replay (worker/policy.py Gate.admit)
        self.service = service
        self.max_attempts = max_attempts
        self.on_change = on_change  # called after the cache changed (registry refresh)
        self.observers = tuple(observers)

    def run(self, payload: Any) -> None:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        try:
            envelope = decode_envelope(payload)
        except InvalidJob as exc:
            log.error("job %s: refused a malformed message: %s", job_id, exc)
            if isinstance(job_id, str) and self.admit(payload, None):  # signed by its tenant
                self._fail(job_id, exc)
            return
        job_id, job = envelope.job_id, envelope.job
        if not self.admit(payload, envelope):  # refused before anything is resolved
            return
        try:
            current = self.store.get(job_id)
        except JobNotFound:
            log.error("job %s: no record; dropping the message", job_id)
            return
        if current.status not in STARTABLE:
            log.info("job %s: already %s; nothing to do", job_id, current.status.value)
            return
        if current.status is JobStatus.running and current.attempt >= self.max_attempts:
            self._fail(job_id, WorkerLost(
                f"the job's worker died {current.attempt} times while running it; it was "
                "stopped so that it can't take down more workers", attempts=current.attempt))
            return
        spot = self.service.spot
        record = self.store.transition(job_id, JobStatus.running, only_from=frozenset({current.status}),
                                       message=f"started on {spot.name}", worker=spot.name,
                                       device=spot.device, attempt=current.attempt + 1)
        if record is None:
            return
        for observer in self.observers:
            observer.job_started(record)
        log.info("job %s: %s attempt %d on %s", job_id, job.kind, record.attempt, spot.name)
        reporter = Reporter(lambda stage, progress, message: self._report(job_id, stage, progress, message),
                            lambda: self.store.cancel_requested(job_id))
        try:
            result = self._execute(job, reporter)
        except Cancelled as exc:
            self.store.transition(job_id, JobStatus.cancelled, message=exc.message)
            log.info("job %s: cancelled", job_id)
        except Exception as exc:
            self._fail(job_id, translate(exc, ref=_ref(job)))
        else:
            self.on_change()  # the registry shows the cache as it is before the record says done
            self.store.transition(job_id, JobStatus.succeeded, result=result, message="done",
                                  progress=Progress(fraction=1.0))
            log.info("job %s: succeeded (%s)", job_id, result.model_key)
        finally:
            self.on_change()
            self._ended(job_id)

    def _execute(self, job: LoadJob | AttachAdapterJob | UnloadJob, reporter: Reporter) -> ModelInfo:
        if isinstance(job, LoadJob):
            return self.service.load(job, reporter)
        if isinstance(job, AttachAdapterJob):
            return self.service.attach(job, reporter)
        return self.service.unload(job, reporter)

    def _ended(self, job_id: str) -> None:
        if self.observers:
            final = self.store.get(job_id)
            for observer in self.observers:
                observer.job_ended(final)

    def _report(self, job_id: str, stage: Stage, progress: Progress | None, message: str | None) -> None:
        self.store.report(job_id, stage, progress, message)

    def _fail(self, job_id: str, exc: ModelqError) -> None:
        error = ErrorInfo(type=exc.type, message=scrub(exc.message), retryable=exc.retryable,
                          details={k: scrub(str(v)) for k, v in exc.details.items()})
        log.warning("job %s: failed: %s: %s", job_id, error.type, error.message)
        try:
            self.store.transition(job_id, JobStatus.failed, error=error, message=error.message)
        except JobNotFound:
            log.error("job %s: no record to fail", job_id)


def _ref(job: LoadJob | AttachAdapterJob | UnloadJob) -> str:
    if isinstance(job, LoadJob):
        return job.model.display
    if isinstance(job, AttachAdapterJob):
        return job.adapter.display
    return job.model_key

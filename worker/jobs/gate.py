"""Which job messages a worker runs at all: the signature gate of a multi-tenant pool.

`SignatureGate.accepts` runs before anything is resolved: signature, expiry, replay
(tasks/auth.py). A single-tenant worker accepts every message (`OpenGate`).

Rule for refused messages: a message that fails verification may mark the record it
names failed/AccessDenied only if that record is still `queued`, belongs to the tenant
the message names, and holds exactly the job and submit time the message carries (so it
is the message the record's own submit sent, e.g. with a wrong or missing key).
Otherwise (a forged message naming someone else's job id, a replay of a finished job)
nothing is written; the refusal is logged without keys or signatures. A correctly signed
message is still refused, without a write, when the record it names belongs to another
tenant or holds another job: a tenant's key moves only that tenant's records.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from schemas import ErrorInfo, JobStatus
from schemas.errors import AccessDenied, JobNotFound
from schemas.jobs import Envelope
from tasks.auth import verify
from tasks.state.store import Store
from tasks.tenants import Tenants

log = logging.getLogger(__name__)


class Gate(Protocol):
    """Decides whether a job message may run here (False: refused, recorded where allowed)."""

    def accepts(self, payload: Any, envelope: Envelope | None) -> bool: ...


class OpenGate:
    """A single-tenant worker's gate: every well-formed message runs; a malformed one may
    fail the record it names."""

    def accepts(self, payload: Any, envelope: Envelope | None) -> bool:
        return True


class SignatureGate:
    """Accepts job messages signed by the tenants of `tenants`; refuses the rest as AccessDenied."""

    def __init__(self, tenants: Tenants, store: Store) -> None:
        self.tenants = tenants
        self.store = store

    def accepts(self, payload: Any, envelope: Envelope | None) -> bool:
        """True when the job may run; False when it was refused (recorded where the rule allows).

        `envelope` is None for a message that did not decode: True then only when it is
        signed by the tenant that owns the record it names (which it may then fail).
        """
        job_id = envelope.job_id if envelope is not None else str(payload.get("job_id"))
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            record = None
        started = record is not None and record.attempt > 0
        try:
            tenant = verify(payload, self.tenants, self.store.redis, self.store.keys,
                            started=started)
        except AccessDenied as exc:
            log.warning("job %s: refused: %s", job_id, exc.message)
            if envelope is not None and record is not None \
                    and record.status is JobStatus.queued \
                    and record.tenant == envelope.job.tenant and record.job == envelope.job \
                    and record.created_at == envelope.submitted_at:
                error = ErrorInfo(type=exc.type, message=exc.message, retryable=False,
                                  details={k: str(v) for k, v in exc.details.items()})
                self.store.transition(job_id, JobStatus.failed, error=error, message=exc.message,
                                      only_from=frozenset({JobStatus.queued}))
            return False
        if envelope is None:
            return record is not None and record.tenant == tenant
        if record is not None and (record.tenant != tenant or record.job != envelope.job):
            log.warning("job %s: refused: the message names a job of another tenant or another "
                        "job than its record holds", job_id)
            return False
        if record is not None and record.terminal:
            log.warning("job %s: refused: the job already ended (a replayed or late message)",
                        job_id)
            return False
        return True

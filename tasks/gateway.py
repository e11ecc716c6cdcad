"""`modelq gateway`: the HTTP API (FastAPI, OpenAPI at /docs) for platforms that don't speak Celery.

A thin skin over `tasks.client.Client`: bodies are the schemas' job JSON, validated by
`parse_job` exactly as the CLI does, and errors are the same `ModelqError`s mapped to
HTTP statuses with an ErrorInfo-shaped body. Who the caller is comes from one
`authenticate(api_key) -> tenant` callable (default: one tenant, 'default', no key);
a tenant sees only its own jobs and models. No torch here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import redis
from fastapi import Body, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr

from schemas import (
    TERMINAL,
    AccessDenied,
    BrokerUnavailable,
    InvalidJob,
    JobNotFound,
    JobRecord,
    ModelNotFound,
    ModelqError,
    QuotaExceeded,
    TimedOut,
    WorkerInfo,
    parse_job,
)
from tasks.client import Client
from tasks.registry import not_resident
from tasks.settings import Settings
from tasks.store import not_found
from tasks.tenants import Tenants, visible_workers

log = logging.getLogger(__name__)

Authenticate = Callable[[str | None], str]
"""Maps an API key (None when the request has none) to a tenant; raises AccessDenied to refuse."""

STATUS: dict[type[ModelqError], int] = {
    InvalidJob: 422, ModelNotFound: 404, JobNotFound: 404, AccessDenied: 403, QuotaExceeded: 429,
    BrokerUnavailable: 503, TimedOut: 504,
}
KEEPALIVE_MS = 15_000


def as_default_tenant(api_key: str | None) -> str:
    """The default `Authenticate`: every caller is tenant 'default' and no key is needed
    (the gateway's side of single-tenant mode, whose Tenants is tasks.tenants.single_tenant)."""
    return "default"


class _Unauthenticated(Exception):
    """`authenticate` refused the caller: 401, not 403."""

    def __init__(self, error: ModelqError) -> None:
        super().__init__(error.message)
        self.error = error


def _status_of(exc: ModelqError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _error(status: int, exc: ModelqError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": exc.type, "message": exc.message, "retryable": exc.retryable}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def _tenant(request: Request, authorization: Annotated[str | None, Header()] = None,
            x_api_key: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant, from `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    key = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    authenticate: Authenticate = request.app.state.authenticate
    try:
        return authenticate(key or None)
    except AccessDenied as exc:
        raise _Unauthenticated(exc) from exc


Tenant = Annotated[str, Depends(_tenant)]
JobBody = Annotated[dict[str, Any], Body(description="A job as the schemas define it (`modelq schema`)")]


def create_gateway(settings: Settings, authenticate: Authenticate = as_default_tenant,
               client: Client | None = None, tenants: Tenants | None = None) -> FastAPI:
    """The gateway app on `settings`' Redis; pass `authenticate` to check API keys.

    With `tenants` (a tenants file), API keys are the tenants' keys and each tenant's
    jobs are signed with its key (tasks/tenants.py, tasks/auth.py).
    """
    signing: dict[str, Client] = {}
    if tenants is not None and tenants.multi:
        authenticate = lambda api_key: tenants.authenticate(api_key or "").name  # noqa: E731
        # The gateway acts for each caller's tenant, never for one of its own environment.
        settings = settings.model_copy(update={"tenant": None, "tenant_key": None})
    app = FastAPI(title="modelq gateway", version="1",
                  description="Submit load, attach and unload jobs; read records; follow events.")
    modelq = client or Client(settings)
    app.state.authenticate = authenticate

    @app.exception_handler(ModelqError)
    def _modelq_error(_request: Request, exc: ModelqError) -> JSONResponse:
        return _error(_status_of(exc), exc)

    @app.exception_handler(_Unauthenticated)
    def _unauthenticated(_request: Request, exc: _Unauthenticated) -> JSONResponse:
        return _error(401, exc.error, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(redis.RedisError)
    def _redis_down(_request: Request, exc: redis.RedisError) -> JSONResponse:
        where = settings.redis_url.rsplit("@", 1)[-1]  # never show a password
        return _error(503, BrokerUnavailable(f"Redis at {where} is unreachable ({type(exc).__name__}); "
                                             "try again when it is back"))

    @app.exception_handler(RequestValidationError)
    def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, InvalidJob("; ".join(str(e.get("msg")) for e in exc.errors())))

    def own_record(job_id: str, who: str) -> JobRecord:
        record = modelq.status(job_id)
        if record.tenant != who:  # another tenant's job does not exist for this caller
            raise not_found(job_id)  # word for word what a missing id gets
        return record

    def submit(body: dict[str, Any], who: str, kind: str | None) -> JSONResponse:
        if kind is not None:
            if body.get("kind", kind) != kind:
                raise InvalidJob(f"this endpoint takes {kind} jobs; the body says kind={body['kind']!r}")
            body = {**body, "kind": kind}
        body = {"tenant": who, **body}
        if body["tenant"] != who:
            raise AccessDenied(f"you are tenant {who!r}: submit jobs as that tenant", tenant=who)
        job = parse_job(body)
        if tenants is not None and tenants.multi and who not in signing:
            signing[who] = Client(settings.model_copy(update={
                "tenant": who, "tenant_key": SecretStr(tenants[who].key)}))
        try:
            handle = signing.get(who, modelq).submit(job)
        except AccessDenied as exc:
            if "model_key" in exc.details:  # another tenant's model does not exist for this caller
                raise not_resident(exc.details["model_key"]) from None
            raise
        record = handle.status()
        return JSONResponse(status_code=202, content=record.model_dump(mode="json"),
                            headers={"Location": f"/v1/jobs/{handle.job_id}"})

    @app.post("/v1/jobs", status_code=202, response_model=JobRecord, tags=["jobs"])
    def submit_job(body: JobBody, who: Tenant) -> JSONResponse:
        """Submit a job of any kind (`kind`: load, attach or unload)."""
        return submit(body, who, None)

    @app.post("/v1/jobs/load", status_code=202, response_model=JobRecord, tags=["jobs"])
    def submit_load(body: JobBody, who: Tenant) -> JSONResponse:
        """Load a model (and adapters) on a worker that can fit it."""
        return submit(body, who, "load")

    @app.post("/v1/jobs/attach", status_code=202, response_model=JobRecord, tags=["jobs"])
    def submit_attach(body: JobBody, who: Tenant) -> JSONResponse:
        """Attach an adapter to a resident model."""
        return submit(body, who, "attach")

    @app.post("/v1/jobs/unload", status_code=202, response_model=JobRecord, tags=["jobs"])
    def submit_unload(body: JobBody, who: Tenant) -> JSONResponse:
        """Free a resident model."""
        return submit(body, who, "unload")

    @app.get("/v1/jobs/{job_id}", response_model=JobRecord, tags=["jobs"])
    def read_job(job_id: str, who: Tenant) -> JobRecord:
        """A job's record: status, stage, progress, result or error."""
        return own_record(job_id, who)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobRecord, tags=["jobs"])
    def cancel_job(job_id: str, who: Tenant) -> JobRecord:
        """Cancel a queued job now, a running one at its next stage."""
        own_record(job_id, who)
        return modelq.cancel(job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}}})
    def job_events(job_id: str, who: Tenant,
                   last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        """The job's events as server-sent events, from the first (or after Last-Event-ID) to the end."""
        own_record(job_id, who)
        return StreamingResponse(_sse(modelq, job_id, last_event_id or "0-0"),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/workers", response_model=list[WorkerInfo], tags=["pool"])
    def list_workers(who: Tenant) -> list[WorkerInfo]:
        """Live workers and, of their resident models, the caller's (and shared bases, with only
        the caller's adapters)."""
        return visible_workers(modelq.workers(), who)

    @app.get("/healthz", tags=["pool"])
    def health() -> dict[str, str]:
        """200 when Redis answers, 503 when it does not."""
        modelq.redis.ping()
        return {"redis": "ok"}

    return app


def _sse(client: Client, job_id: str, after: str) -> Iterator[str]:
    """Stream ids become SSE ids, so a client that reconnects resumes with Last-Event-ID."""
    while True:
        try:
            batch = client.store.events(job_id, after=after, block_ms=KEEPALIVE_MS)
        except redis.RedisError as exc:
            yield f"event: error\ndata: {json.dumps({'type': 'BrokerUnavailable', 'message': str(exc)})}\n\n"
            return
        for after, event in batch:
            yield f"id: {after}\nevent: {event.status.value}\ndata: {event.model_dump_json()}\n\n"
            if event.status in TERMINAL:
                return
        if not batch:
            if client.status(job_id).terminal:
                return
            yield ": keepalive\n\n"


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
    TaskNotFound,
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
    InvalidJob: 422, ModelNotFound: 404, JobNotFound: 404, TaskNotFound: 404, AccessDenied: 403,
    QuotaExceeded: 429,
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
    if tenants is not None and tenants.multi:
        authenticate = lambda api_key: tenants.authenticate(api_key or "").name  # noqa: E731
        # The gateway acts for each caller's tenant, never for one of its own environment.
        settings = settings.model_copy(update={"tenant": None, "tenant_key": None})
    app = FastAPI(title="modelq gateway", version="1",
                  description="Submit load, attach, unload and run jobs; read records; follow "
                              "events.")
    app.state.authenticate = authenticate
    jobs = _Jobs(settings, client or Client(settings), tenants)
    _install_errors(app, settings)
    _job_routes(app, jobs)
    _pool_routes(app, jobs.modelq)
    return app


def _install_errors(app: FastAPI, settings: Settings) -> None:
    """Every error in the one shape: {"error": {type, message, retryable}}."""
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


class _Jobs:
    """Submitting and reading jobs for a caller's tenant (signed with its key when multi-tenant)."""

    def __init__(self, settings: Settings, modelq: Client, tenants: Tenants | None) -> None:
        self.settings = settings
        self.modelq = modelq
        self.tenants = tenants
        self._signing: dict[str, Client] = {}

    def own_record(self, job_id: str, who: str) -> JobRecord:
        record = self.modelq.status(job_id)
        if record.tenant != who:  # another tenant's job does not exist for this caller
            raise not_found(job_id)  # word for word what a missing id gets
        return record

    def submit(self, body: dict[str, Any], who: str, kind: str | None) -> JSONResponse:
        if kind is not None:
            if body.get("kind", kind) != kind:
                raise InvalidJob(f"this endpoint takes {kind} jobs; the body says kind={body['kind']!r}")
            body = {**body, "kind": kind}
        body = {"tenant": who, **body}
        if body["tenant"] != who:
            raise AccessDenied(f"you are tenant {who!r}: submit jobs as that tenant", tenant=who)
        job = parse_job(body)
        try:
            handle = self._client(who).submit(job)
        except AccessDenied as exc:
            if "model_key" in exc.details:  # another tenant's model does not exist for this caller
                raise not_resident(exc.details["model_key"]) from None
            raise
        record = handle.status()
        return JSONResponse(status_code=202, content=record.model_dump(mode="json"),
                            headers={"Location": f"/v1/jobs/{handle.job_id}"})

    def _client(self, who: str) -> Client:
        tenants = self.tenants
        if tenants is None or not tenants.multi:
            return self.modelq
        if who not in self._signing:
            self._signing[who] = Client(self.settings.model_copy(update={
                "tenant": who, "tenant_key": SecretStr(tenants[who].key)}))
        return self._signing[who]


def _job_routes(app: FastAPI, jobs: _Jobs) -> None:
    for kind, summary in _KINDS.items():
        app.add_api_route(f"/v1/jobs/{kind}", _submitter(jobs, kind), methods=["POST"],
                          status_code=202, response_model=JobRecord, tags=["jobs"],
                          summary=summary, name=f"submit_{kind}")

    @app.post("/v1/jobs", status_code=202, response_model=JobRecord, tags=["jobs"])
    def submit_job(body: JobBody, who: Tenant) -> JSONResponse:
        """Submit a job of any kind (`kind`: load, attach, unload or run)."""
        return jobs.submit(body, who, None)

    @app.get("/v1/jobs/{job_id}", response_model=JobRecord, tags=["jobs"])
    def read_job(job_id: str, who: Tenant) -> JobRecord:
        """A job's record: status, stage, progress, result or error."""
        return jobs.own_record(job_id, who)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobRecord, tags=["jobs"])
    def cancel_job(job_id: str, who: Tenant) -> JobRecord:
        """Cancel a queued job now, a running one at its next stage."""
        jobs.own_record(job_id, who)
        return jobs.modelq.cancel(job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}}})
    def job_events(job_id: str, who: Tenant,
                   last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        """The job's events as server-sent events, from the first (or after Last-Event-ID) to the end."""
        jobs.own_record(job_id, who)
        return StreamingResponse(_sse(jobs.modelq, job_id, last_event_id or "0-0"),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_KINDS = {"load": "Load a model (and adapters) on a worker that can fit it.",
          "attach": "Attach an adapter to a resident model.",
          "unload": "Free a resident model.",
          "run": "Run a model task on a resident model (loaded first for a load spec)."}


def _submitter(jobs: _Jobs, kind: str) -> Callable[..., JSONResponse]:
    def submit(body: JobBody, who: Tenant) -> JSONResponse:
        return jobs.submit(body, who, kind)
    submit.__doc__ = _KINDS[kind]
    return submit


def _pool_routes(app: FastAPI, modelq: Client) -> None:
    @app.get("/v1/workers", response_model=list[WorkerInfo], tags=["pool"])
    def list_workers(who: Tenant) -> list[WorkerInfo]:
        """Live workers and, of their resident models, the caller's (and shared bases, with only
        the caller's adapters)."""
        return visible_workers(modelq.workers(), who)

    @app.get("/v1/tasks", response_model=dict[str, list[str]], tags=["pool"])
    def list_tasks(who: Tenant) -> dict[str, list[str]]:
        """The model tasks the live workers offer, each with the workers that offer it."""
        return modelq.tasks()

    @app.get("/healthz", tags=["pool"])
    def health() -> dict[str, str]:
        """200 when Redis answers, 503 when it does not."""
        modelq.redis.ping()
        return {"redis": "ok"}


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

